"""Host weight cache: read once, atomic, cleaned up, crash leftovers swept."""

from __future__ import annotations

import pytest

import cluster.engine.weight_cache as wc
from cluster.errors import CheckpointError


@pytest.fixture
def shm(tmp_path, monkeypatch):
    monkeypatch.setattr(wc, "SHM_ROOT", tmp_path)
    return tmp_path


def test_put_copies_weights_once_and_close_frees(shm, tiny_models):
    cache = wc.HostWeightCache(owner="t")
    entry = cache.put("a", tiny_models["tiny-llama-a"])
    src = tiny_models["tiny-llama-a"] / "model.safetensors"
    assert (entry.dir / "model.safetensors").read_bytes() == src.read_bytes()
    assert entry.weights_bytes == src.stat().st_size == cache.total_bytes
    assert not (entry.dir / "config.json").exists()  # weights only
    mtime = (entry.dir / "model.safetensors").stat().st_mtime_ns
    assert cache.put("a", "/does/not/matter") is entry  # cached: no second read
    assert (entry.dir / "model.safetensors").stat().st_mtime_ns == mtime
    cache.drop("a")
    assert not entry.dir.exists() and cache.total_bytes == 0
    cache.close()
    assert not cache.root.exists()


def test_put_without_weights_is_a_clear_error(shm, tmp_path):
    cache = wc.HostWeightCache(owner="t")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        cache.put("x", tmp_path / "empty")
    assert cache.names() == []


def test_caches_of_dead_workers_are_swept(shm):
    dead = shm / "shoal-999999999-cpu0-deadbeef"
    dead.mkdir()
    live = shm / f"shoal-{wc.os.getpid()}-cpu1-cafecafe"
    live.mkdir()
    wc.HostWeightCache(owner="t")
    assert not dead.exists() and live.exists()
