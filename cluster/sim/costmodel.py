"""How long engine work takes on a device: a roofline cost model.

Every figure below is named and says where it comes from. Datasheet peaks
come from the device profile (``cluster/sim/data/devices.json``); the
fractions of them an engine achieves are assumptions here, to be calibrated
against a measured profile (``shoal profile``) and the fidelity run.

- **Prefill** of n tokens (one request, or a batch: the sum) is
  compute-bound: ``(2 * params * n + 2 * layers * hidden * n^2) /
  (FLOP/s * PREFILL_MFU)`` (weights: one multiply-add per parameter per
  token; causal attention: QK^T and AV over half the n x n square), never
  below one read of the weights at ``DECODE_MBU`` of the bandwidth.
- **Decode**, one step of a batch of b requests holding C context tokens in
  all, is memory-bound: ``(weights_bytes + C * kv_bytes_per_token) /
  (bandwidth * DECODE_MBU)``, or compute-bound at large batches:
  ``(2 * params * b + 4 * layers * hidden * C) / (FLOP/s * DECODE_MFU)``,
  whichever is longer.
- Both pay ``STEP_OVERHEAD_S`` per engine step (scheduling, sampling, launches).
- **Re-prefill** on resume is a prefill of prompt + delivered tokens: the
  time-shared engine drops a preempted request's KV cache.
- **Switches** move the weights over the host link (pinned host memory to
  device) plus a fixed cost that depends on how (``Switch``).
- A **tensor-parallel** group (``profiles.tp_group``) has n times the peaks,
  derated by ``TP_EFFICIENCY`` for its all-reduces.

A device with a measured profile (``DeviceProfile.measured``) uses the
measured times instead (``MeasuredCost``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from enum import Enum
from typing import Protocol

from cluster.sim.profiles import DeviceProfile, MeasuredEngine, ModelProfile

# --- achievable fractions of the datasheet peaks (assumptions) --------------
# Compute-bound prefill kernels reach about half of dense peak. Assumption,
# in the range serving papers report; calibrate with the fidelity run.
PREFILL_MFU = 0.5
# Decode reads every weight once per step. Tuned kernels reach 60-80% of peak
# HBM bandwidth ("MBU" as defined in Databricks' "LLM Inference Performance
# Engineering: Best Practices", 2023); 0.7 is our assumption in that range.
DECODE_MBU = 0.7
# The compute side of a decode step (it binds only at large batches).
DECODE_MFU = 0.5
# Per engine step outside the kernels: scheduler, sampling, kernel launches
# (vLLM's CPU-side step overhead is a few ms). Assumption.
STEP_OVERHEAD_S = 0.004
# All-reduce overhead of a tensor-parallel group over NVLink. Assumption.
TP_EFFICIENCY = 0.85

# --- switches -----------------------------------------------------------------
# In-place swap into a running engine (Shoal's component reuse; Aegaeon's
# engine reuse): weights over the host link plus re-pointing and a
# prefix-cache reset. Assumption; on CPU `shoal bench swap` measures it.
SWAP_FIXED_S = 0.05
# vLLM level-1 sleep-mode wake, fitted through the two published points in
# MISSION.md (A100, PCIe 4 at ~25 GB/s): Qwen3-0.6B (~1.2 GB) in 0.26 s and
# Qwen3-8B (~16.4 GB) in 2.2 s. The line through them: a fixed cost and an
# effective copy rate, expressed as a fraction of that host link.
WAKE_ANCHORS = ((1.2e9, 0.26), (16.4e9, 2.2))
WAKE_ANCHOR_LINK_BYTES_PER_S = 25e9
_WAKE_S_PER_BYTE = (WAKE_ANCHORS[1][1] - WAKE_ANCHORS[0][1]) / (WAKE_ANCHORS[1][0] -
                                                                 WAKE_ANCHORS[0][0])
WAKE_FIXED_S = WAKE_ANCHORS[0][1] - WAKE_ANCHORS[0][0] * _WAKE_S_PER_BYTE  # ~0.11 s
WAKE_LINK_EFFICIENCY = 1 / (_WAKE_S_PER_BYTE * WAKE_ANCHOR_LINK_BYTES_PER_S)  # ~0.31
# A new vLLM engine: process start, profiling, CUDA graphs, before weights.
# Assumption (tens of seconds on GPUs; MISSION.md measured ~37 s for a tiny
# model on CPU, nearly all of it start-up).
FRESH_ENGINE_INIT_S = 30.0
# ServerlessLLM's checkpoint loading: Llama-3.1-8B (16.06 GB) from host DRAM
# in 0.7 s on an H100 (MISSION.md), i.e. this fraction of the ~55 GB/s link.
# Its engine is taken as already initialized (no start-up cost): generous to
# that baseline on purpose.
SERVERLESS_ANCHOR = (16.06e9, 0.7, 55e9)
SERVERLESS_LINK_EFFICIENCY = SERVERLESS_ANCHOR[0] / SERVERLESS_ANCHOR[1] / SERVERLESS_ANCHOR[2]


class Switch(str, Enum):
    """How a model's weights get into an engine."""

    IN_PLACE = "in_place"  # swapped into a running engine of its family
    WAKE = "wake"  # a sleeping engine of its own wakes up
    FRESH = "fresh"  # a new engine starts
    SERVERLESS = "serverless"  # ServerlessLLM's loader into a ready engine


class CostModel(Protocol):
    """Seconds of engine work on one device, at full speed (not shared)."""

    def prefill_s(self, model: ModelProfile, tokens: Sequence[int]) -> float:
        """Prefill requests of these context lengths in one batch."""
        ...

    def decode_step_s(self, model: ModelProfile, batch: int, context_tokens: int) -> float:
        """One decode step of ``batch`` requests holding ``context_tokens`` in all."""
        ...

    def switch_s(self, model: ModelProfile, kind: Switch) -> float:
        ...


class RooflineCost:
    """The roofline model above, for a datasheet device profile."""

    def __init__(self, device: DeviceProfile):
        tp = TP_EFFICIENCY if device.devices > 1 else 1.0
        self.device = device
        self.bandwidth = device.memory_bandwidth_bytes_per_s * tp
        self.flops = device.dense_flops_per_s * tp
        self.link = device.host_link_bytes_per_s

    def prefill_s(self, model: ModelProfile, tokens: Sequence[int]) -> float:
        flops = sum(2 * model.params * n + 2 * model.layers * model.hidden_size * n * n
                    for n in tokens)
        compute = flops / (self.flops * PREFILL_MFU)
        weights = model.weights_bytes / (self.bandwidth * DECODE_MBU)
        return max(compute, weights) + STEP_OVERHEAD_S

    def decode_step_s(self, model: ModelProfile, batch: int, context_tokens: int) -> float:
        memory = (model.weights_bytes + context_tokens * model.kv_bytes_per_token) / \
            (self.bandwidth * DECODE_MBU)
        compute = (2 * model.params * batch + 4 * model.layers * model.hidden_size *
                   context_tokens) / (self.flops * DECODE_MFU)
        return max(memory, compute) + STEP_OVERHEAD_S

    def switch_s(self, model: ModelProfile, kind: Switch) -> float:
        copy_s = model.weights_bytes / self.link
        if kind is Switch.IN_PLACE:
            return SWAP_FIXED_S + copy_s
        if kind is Switch.WAKE:
            return WAKE_FIXED_S + copy_s / WAKE_LINK_EFFICIENCY
        if kind is Switch.SERVERLESS:
            return copy_s / SERVERLESS_LINK_EFFICIENCY
        return FRESH_ENGINE_INIT_S + copy_s


class MeasuredCost:
    """Times measured on a real engine (``shoal profile``), used as they are
    for every model on the device: a measured profile describes the model it
    was measured with, and the fidelity run serves aliases of that model.
    Decode steps are interpolated linearly between the measured batch sizes
    (extrapolated from the last two beyond them); context length is not
    modelled (the measured model's contexts are short)."""

    def __init__(self, device: DeviceProfile):
        if device.measured is None:
            raise ValueError(f"device {device.name!r} has no measured profile")
        self.device = device
        self.m: MeasuredEngine = device.measured
        self._batches = sorted(self.m.decode_step_s_by_batch)

    def prefill_s(self, model: ModelProfile, tokens: Sequence[int]) -> float:
        return self.m.prefill_fixed_s + self.m.prefill_per_token_s * sum(tokens)

    def decode_step_s(self, model: ModelProfile, batch: int, context_tokens: int) -> float:
        bs, table = self._batches, self.m.decode_step_s_by_batch
        if len(bs) == 1:
            return table[bs[0]]
        i = min(max(bisect.bisect_left(bs, batch), 1), len(bs) - 1)
        lo, hi = bs[i - 1], bs[i]
        slope = (table[hi] - table[lo]) / (hi - lo)
        return max(table[bs[0]], table[lo] + slope * (batch - lo))

    def switch_s(self, model: ModelProfile, kind: Switch) -> float:
        # A CPU has no sleep mode (vLLM refuses it): a wake is a new engine.
        return self.m.swap_s if kind is Switch.IN_PLACE else self.m.fresh_engine_s


def cost_model(device: DeviceProfile) -> CostModel:
    return MeasuredCost(device) if device.measured is not None else RooflineCost(device)
