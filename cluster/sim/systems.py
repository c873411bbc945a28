"""The systems compared on the same trace and cost model.

Each is a ``System``: which placement policy from ``policies/`` runs (or a
static placement), whether devices time-share at token level, how a new
engine gets its weights, and how much KV cache an engine reserves.

- ``shoal``: the default policy (``policies/default.py``) over devices that
  time-share: same-family models take token-level turns on one engine
  (``policies/turns.py``, the machine the live engine worker runs), judged
  as ``GPU_TURNS`` says. An engine takes the device as vLLM does by default
  (``WHOLE_DEVICE_FRACTION``), so a device serves one family, its models
  taking turns. New engines start fresh (vLLM start-up).
- ``dedicated``: ``policies/baselines.py``'s ``DedicatedPolicy``: one model
  per device, always on.
- ``serverless``: ServerlessLLM-like request-level scale-to-zero with LRU
  eviction (``LRUScaleToZeroPolicy``). Its engines take the device as vLLM
  does by default (``WHOLE_DEVICE_FRACTION`` of its memory), so one model per
  device, and load with ServerlessLLM's fast loader (about 0.7 s for an 8B
  model on an H100, ``costmodel.SERVERLESS_ANCHOR``) into an engine taken as
  already initialized.
- ``muxserve``: MuxServe-like static spatial multiplexing: placed once, from
  the models' known rates, most popular first, at most
  ``MUXSERVE_MODELS_PER_DEVICE`` models per device (MuxServe fits 2-3),
  each its own engine with ``KV_TOKENS`` of KV; co-located engines share the
  device's compute. Never moves; a model that finds no room is not served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cluster.sim.costmodel import Switch
from cluster.sim.profiles import DeviceProfile, ModelProfile
from policies.turns import TOKEN, TurnConfig

# KV cache an engine reserves, in tokens of its model: ~64 concurrent
# requests of ShareGPT-like length (500 tokens of context).
KV_TOKENS = 32768
# vLLM's default gpu_memory_utilization: an engine takes this much of its device.
WHOLE_DEVICE_FRACTION = 0.9
MUXSERVE_MODELS_PER_DEVICE = 3
# The turn knobs on simulated GPUs. Aegaeon's 4 s round bound as in the catalog;
# "token" turns are judged every 1 s, not the catalog's 10 ms (right for CPU
# swaps of milliseconds): with a GPU swap of ~0.33 s plus re-prefill, short
# turns thrash. One H800, 5 Qwen2.5-7B at 0.1 req/s: 75% attainment at 0.05 s,
# 100% at 1.0 s; 7 models: 9% and 98% (cluster/sim/fidelity.py's single-device
# runs; see README "Simulator").
GPU_TURNS = TurnConfig(discipline=TOKEN, min_quota_s=1.0, max_round_s=4.0,
                       default_step_s=0.02)


@dataclass(frozen=True)
class ServedModel:
    """One model the cluster serves (a catalog entry, for the simulator)."""

    profile: ModelProfile
    ttft_slo_s: float = 10.0
    tpot_slo_s: float = 0.1
    allowed_vendors: tuple[str, ...] = ()  # empty = any
    rate: float = 0.0  # expected arrivals per second (static placement uses it)

    @property
    def name(self) -> str:
        return self.profile.name

    def allowed_on(self, device: DeviceProfile) -> bool:
        return not self.allowed_vendors or device.vendor in self.allowed_vendors


@dataclass(frozen=True)
class System:
    name: str
    policy: str | None  # a policies/ registry name; None: static placement
    turns: TurnConfig | None  # devices time-share with these knobs; None: they do not
    load: Switch  # how a new engine gets its weights
    whole_device_kv: bool  # an engine reserves the device (vLLM's default) vs KV_TOKENS
    policy_config: dict = field(default_factory=dict, hash=False)


SYSTEMS = {
    "shoal": System("shoal", "default", GPU_TURNS, Switch.FRESH, whole_device_kv=True),
    "dedicated": System("dedicated", "dedicated", None, Switch.FRESH, whole_device_kv=True),
    "serverless": System("serverless", "lru", None, Switch.SERVERLESS, whole_device_kv=True),
    "muxserve": System("muxserve", None, None, Switch.FRESH, whole_device_kv=False),
}


def kv_cache_bytes(system: System, model: ServedModel,
                   devices: Sequence[DeviceProfile]) -> int:
    """The KV cache one engine of ``model`` reserves under ``system``."""
    tokens = KV_TOKENS * model.profile.kv_bytes_per_token
    if not system.whole_device_kv:
        return tokens
    room = [int(WHOLE_DEVICE_FRACTION * d.memory_bytes) - model.profile.weights_bytes
            for d in devices if model.allowed_on(d)]
    room = [r for r in room if r > 0]
    return min(room) if room else tokens


def muxserve_placement(models: Sequence[ServedModel], devices: Sequence[tuple[str, DeviceProfile]],
                       footprint: dict[str, int]) -> list[tuple[str, str]]:
    """(model, device) pairs: most popular model first, each onto the allowed
    device with the least expected load that has room and fewer than
    ``MUXSERVE_MODELS_PER_DEVICE`` models (ties: the lowest id)."""
    load = {d: 0.0 for d, _ in devices}
    count = {d: 0 for d, _ in devices}
    free = {d: p.memory_bytes for d, p in devices}
    out = []
    for m in sorted(models, key=lambda m: (-m.rate, m.name)):
        options = [d for d, p in devices if m.allowed_on(p) and count[d] < MUXSERVE_MODELS_PER_DEVICE
                   and free[d] >= footprint[m.name]]
        if not options:
            continue
        d = min(options, key=lambda d: (load[d], d))
        load[d] += m.rate
        count[d] += 1
        free[d] -= footprint[m.name]
        out.append((m.name, d))
    return out
