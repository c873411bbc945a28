"""Load-time checks of a catalog against its checkpoints and vLLM
(``cluster/engine/catalog_checks.py``): a path that is not a checkpoint, an
architecture vLLM cannot run, a family whose members could not share an
engine, a model bigger than every device. Each fails when the app is built,
naming the field, instead of when a request first needs the model."""

from __future__ import annotations

import json
import shutil

import pytest

from cluster.catalog import CatalogError, load_catalog
from cluster.engine.catalog_checks import check_catalog
from cluster.engine.checkpoint import read_checkpoint
from cluster.testing.tiny_models import cast_checkpoint, write_variant
from serve_apps.app import load_app_catalog

GiB = 2**30


def model(name, path, family="tiny-llama", **kw):
    return {"name": name, "path": str(path), "family": family, **kw}


def check(catalog: dict):
    return check_catalog(load_catalog(catalog))


@pytest.fixture(scope="module")
def variants(tiny_models, tmp_path_factory):
    """Same-family look-alikes of tiny-llama-a that cannot swap with it."""
    out = tmp_path_factory.mktemp("variants")
    wide = write_variant("tiny-llama-a", out, "tiny-llama-wide", hidden_size=256)
    fp32 = cast_checkpoint(tiny_models["tiny-llama-a"], out / "tiny-llama-fp32", "float32")
    return {"wide": wide, "fp32": fp32}


def test_a_good_catalog_passes_unchanged(tiny_models):
    cat = load_catalog({"models": [
        model("a", tiny_models["tiny-llama-a"]), model("b", tiny_models["tiny-llama-b"]),
        model("a-again", tiny_models["tiny-llama-a"]),
        model("q", tiny_models["tiny-qwen"], family="tiny-qwen")]})
    assert check_catalog(cat) is cat


def test_paths_that_are_not_checkpoints_name_the_field(tiny_models, tmp_path):
    (tmp_path / "empty").mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_models["tiny-llama-a"] / "config.json", no_weights)
    torn = tmp_path / "torn"
    shutil.copytree(tiny_models["tiny-llama-a"], torn)
    (torn / "model.safetensors").write_bytes(b"\xff" * 8 + b"{")  # absurd header length
    with pytest.raises(CatalogError) as e:
        check({"models": [model("ok", tiny_models["tiny-llama-a"]),
                          model("missing", tmp_path / "nope"),
                          model("empty", tmp_path / "empty"),
                          model("no-weights", no_weights),
                          model("torn", torn)]})
    msg = str(e.value)
    assert "models.0" not in msg  # every problem, and only those, each named
    assert "models.1.path: checkpoint path" in msg and "does not exist" in msg
    assert "models.2.path:" in msg and "no config.json" in msg
    assert "models.3.path:" in msg and "no *.safetensors" in msg
    assert "models.4.path:" in msg and "unreadable model.safetensors" in msg


def test_an_architecture_vllm_cannot_run_is_refused(tiny_models, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_models["tiny-llama-a"], odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(CatalogError, match=r"models\.1\.path: architecture 'NoSuchForCausalLM'"):
        check({"models": [model("a", tiny_models["tiny-llama-a"]),
                          model("odd", odd, family="odd")]})


def test_a_family_whose_shapes_differ_names_the_family_both_models_and_the_difference(
        tiny_models, variants):
    with pytest.raises(CatalogError) as e:
        check({"models": [model("a", tiny_models["tiny-llama-a"]),
                          model("wide", variants["wide"])]})
    msg = str(e.value)
    assert "models.1.family: family 'tiny-llama'" in msg
    assert "'wide'" in msg and "'a' (models.0)" in msg
    assert "hidden_size: 128 vs 256" in msg


def test_a_family_whose_dtypes_differ_is_refused_and_cannot_swap(tiny_models, variants):
    with pytest.raises(CatalogError, match=r"models\.1\.family: .*tensor \S+: BF16 \[.*\] vs F32"):
        check({"models": [model("a", tiny_models["tiny-llama-a"]),
                          model("fp32", variants["fp32"])]})
    # The same signature guards the worker's in-place swap.
    assert read_checkpoint(variants["fp32"]).swap_signature != \
        read_checkpoint(tiny_models["tiny-llama-a"]).swap_signature


def test_another_architecture_in_a_family_is_refused(tiny_models):
    with pytest.raises(CatalogError,
                       match=r"models\.1\.family: .*'q' .*model_type: 'llama' vs 'qwen2'"):
        check({"models": [model("a", tiny_models["tiny-llama-a"]),
                          model("q", tiny_models["tiny-qwen"])]})


def test_a_model_bigger_than_every_device_names_the_model(tiny_models):
    big = model("big", tiny_models["tiny-llama-a"], kv_cache_bytes=40 * GiB)
    devices = {"cpu_devices": [{"id": "c0", "memory_bytes": 8 * GiB}],
               "discovery": {"accelerators": {"L4": {"memory_bytes": 24 * GiB}}}}
    with pytest.raises(CatalogError, match=r"models\.1: weights_bytes \+ kv_cache_bytes"):
        check({"models": [model("a", tiny_models["tiny-llama-a"]), big], **devices})
    # Room on one device is enough: an accelerator profile, a CPU device, or
    # the default memory of accelerator types without a profile.
    check({"models": [big], "discovery": {"accelerators": {"H200": {"memory_bytes": 141 * GiB}}}})
    check({"models": [big], "cpu_devices": [{"id": "c0", "memory_bytes": 64 * GiB}]})
    check({"models": [big], "discovery": {"default_accelerator_memory_bytes": 48 * GiB}})


def test_the_app_builder_checks_and_the_demo_checks_after_writing(tmp_path, tiny_models):
    """The production builder runs the checks; the demo writes its tiny
    checkpoints first, so a catalog naming missing tiny models still builds."""
    from cluster.testing.tiny_models import ensure_tiny_models

    missing = {"models": [model("x", tmp_path / "tiny-llama-b")]}
    with pytest.raises(CatalogError, match=r"models\.0\.path"):
        load_app_catalog({"catalog": missing})
    ensure_tiny_models(load_catalog(missing))
    assert load_app_catalog({"catalog": missing}).model("x").weights_bytes > 0


def test_the_shipped_catalog_passes_once_the_demo_wrote_its_models(tmp_path, tiny_models):
    """ray_configs/models.yaml, as the demo builds it: every check passes."""
    from pathlib import Path

    from cluster.testing.tiny_models import ensure_tiny_models

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "ray_configs").mkdir()
    shipped = tmp_path / "ray_configs" / "models.yaml"
    shutil.copy(repo / "ray_configs" / "models.yaml", shipped)
    (tmp_path / ".shoal").mkdir()
    shutil.copytree(tiny_models["tiny-llama-a"].parent, tmp_path / ".shoal" / "models")
    ensure_tiny_models(load_catalog(shipped))
    cat = load_app_catalog({"catalog": str(shipped)})
    assert [m.name for m in cat.models] == ["tiny-llama-a", "tiny-llama-b", "tiny-llama-c",
                                            "tiny-qwen"]
