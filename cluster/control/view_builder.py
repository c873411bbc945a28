"""Engine-worker stats -> the ``ClusterView`` a policy decides on.

The workers are the source of truth for what is where; the controller only
caches their last ``stats()``. A pure function, so the controller and the
tests build views the same way.
"""

from __future__ import annotations

from cluster.catalog import ModelSpec
from cluster.engine.contract import ModelState, ModelStatus, WorkerStats
from cluster.engine.device import DeviceSpec
from policies.view import (ACTIVE, LOADING, PARKED, ClusterView, Demand, DeviceView, ModelView,
                           Placement)

# Worker states as the policy sees them; "unloading" copies are already on
# their way out and are not shown. A time-share member holds device memory
# while its weights are in the engine and is parked otherwise.
_POLICY_STATE = {ModelState.LOADING: LOADING, ModelState.ACTIVE: ACTIVE,
                 ModelState.PARKED: PARKED}


def device_view(d: DeviceSpec) -> DeviceView:
    return DeviceView(id=d.id, node=d.node_id or "", vendor=d.vendor,
                      accelerator_type=d.accelerator_type, memory_bytes=d.memory_bytes,
                      speed=d.speed, cost_per_hour=d.cost_per_hour)


def placement(device: str, m: ModelStatus) -> Placement | None:
    if m.state is ModelState.TIMESHARED:
        state = ACTIVE if m.in_engine else PARKED
    else:
        state = _POLICY_STATE.get(m.state)
    if state is None:
        return None
    return Placement(device, state, m.inflight, timeshared=m.timeshared,
                     ttft_s=m.ttft_s, tpot_s=m.tpot_s)


def placements(stats: dict[str, WorkerStats]) -> dict[str, list[Placement]]:
    """model -> its copies, from every live worker's stats."""
    out: dict[str, list[Placement]] = {}
    for dev_id in sorted(stats):
        for name, m in stats[dev_id].models.items():
            p = placement(dev_id, m)
            if p is not None:
                out.setdefault(name, []).append(p)
    return out


def model_view(spec: ModelSpec, copies: list[Placement]) -> ModelView:
    return ModelView(
        name=spec.name, family=spec.family, weights_bytes=spec.weights_bytes,
        kv_cache_bytes=spec.kv_cache_bytes, ttft_slo_s=spec.slo.ttft_s,
        tpot_slo_s=spec.slo.tpot_s, allowed_vendors=tuple(spec.allowed_vendors),
        allowed_accelerators=tuple(spec.allowed_accelerators),
        min_replicas=spec.min_replicas, max_replicas=spec.max_replicas,
        pinned=spec.pinned, placements=tuple(copies))


def build_view(devices: dict[str, DeviceSpec], stats: dict[str, WorkerStats],
               specs: dict[str, ModelSpec], demand: dict[str, Demand]) -> ClusterView:
    live = [devices[d] for d in sorted(stats) if d in devices]
    where = placements(stats)
    return ClusterView(
        devices=tuple(device_view(d) for d in live),
        models=tuple(model_view(specs[n], where.get(n, [])) for n in sorted(specs)),
        demand=demand)
