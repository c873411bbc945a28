"""Catalog schema: valid files load, invalid ones name the bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.catalog import CatalogError, load_catalog

REPO = Path(__file__).resolve().parents[1]


def test_shipped_catalog_loads_and_resolves_paths():
    cat = load_catalog(REPO / "ray_configs" / "models.yaml")
    names = [m.name for m in cat.models]
    assert names == ["tiny-llama-a", "tiny-llama-b", "tiny-llama-c", "tiny-qwen"]
    assert Path(cat.model("tiny-qwen").path).is_absolute()
    assert cat.model("tiny-qwen").allowed_vendors == ["cpu", "nvidia", "amd"]
    assert [d.id for d in cat.cpu_devices] == ["cpu0", "cpu1"]


def test_sizes_are_read_from_the_checkpoint(tiny_models):
    cat = load_catalog({"models": [{"name": "a", "path": str(tiny_models["tiny-llama-a"]),
                                    "family": "tiny-llama"}]})
    m = cat.model("a")
    assert m.weights_bytes == (tiny_models["tiny-llama-a"] / "model.safetensors").stat().st_size
    # hidden 128, 2 layers, vocab 512: embeddings + lm_head alone are 2*512*128
    assert 2 * 512 * 128 < m.param_count < m.weights_bytes


@pytest.mark.parametrize("bad, field", [
    ({"models": [{"name": "x", "path": "/p", "family": "f", "slo": {"ttft_s": -1}}]},
     "models.0.slo.ttft_s"),
    ({"models": [{"name": "x", "path": "/p"}]}, "models.0.family"),
    ({"models": [{"name": "x", "path": "/p", "family": "f", "kv_cache_byte": 5}]},
     "models.0.kv_cache_byte"),
    ({"models": [{"name": "x", "path": "/p", "family": "f", "min_replicas": 3,
                  "max_replicas": 1}]}, "models.0"),
    ({"models": [{"name": "x", "path": "/p", "family": "f"},
                 {"name": "x", "path": "/q", "family": "f"}]}, "duplicate model name"),
    ({"cpu_devices": [{"id": "c", "memory_bytes": 0}]}, "cpu_devices.0.memory_bytes"),
    ({"cpu_devices": [{"id": "c", "memory_bytes": 1, "timeshare": {"discipline": "fair"}}]},
     "cpu_devices.0.timeshare.discipline"),
    ({"discovery": {"accelerators": {"L4": {
        "memory_bytes": 1, "timeshare": {"min_quota_s": 5, "max_round_s": 1}}}}},
     "discovery.accelerators.L4.timeshare"),
    ({"capacity": {"accelerators": {"H100": {}}}}, "capacity.accelerators.H100: no profile"),
    ({"discovery": {"accelerators": {"H100": {"memory_bytes": 1}}},
      "capacity": {"accelerators": {"H100": {"max_devices": 0}}}},
     "capacity.accelerators.H100.max_devices"),
    ({"capacity": {"release_idle_s": -1}}, "capacity.release_idle_s"),
])
def test_invalid_catalog_names_the_field(bad, field):
    with pytest.raises(CatalogError, match=field.replace(".", r"\.")):
        load_catalog(bad)


def test_unreadable_yaml_is_a_catalog_error(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("models: [unclosed")
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_catalog(p)
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_catalog(tmp_path / "missing.yaml")
