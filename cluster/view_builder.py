"""Engine-worker stats -> the ``ClusterView`` a policy decides on.

The workers are the source of truth for what is where; the controller only
caches their last ``stats()``. A pure function, so the controller and the
tests build views the same way.
"""

from __future__ import annotations

from cluster.catalog import ModelSpec
from cluster.device import DeviceSpec
from policies.view import ClusterView, Demand, DeviceView, ModelView, Placement

# Worker states the policy sees; "unloading" copies are already on their way out.
_VISIBLE = {"loading", "active", "parked"}


def device_view(d: DeviceSpec) -> DeviceView:
    return DeviceView(id=d.id, node=d.node_id or "", vendor=d.vendor,
                      accelerator_type=d.accelerator_type, memory_bytes=d.memory_bytes,
                      speed=d.speed, cost_per_hour=d.cost_per_hour)


def placements(stats: dict[str, dict]) -> dict[str, list[Placement]]:
    """model -> its copies, from every live worker's stats."""
    out: dict[str, list[Placement]] = {}
    for dev_id in sorted(stats):
        for name, m in stats[dev_id]["models"].items():
            if m["state"] in _VISIBLE:
                out.setdefault(name, []).append(Placement(
                    dev_id, m["state"], m["running"] + m["waiting"],
                    timeshared=bool(m.get("timeshared")),
                    ttft_s=m.get("ttft_s"), tpot_s=m.get("tpot_s")))
    return out


def model_view(spec: ModelSpec, copies: list[Placement]) -> ModelView:
    return ModelView(
        name=spec.name, family=spec.family, weights_bytes=spec.weights_bytes,
        kv_cache_bytes=spec.kv_cache_bytes, ttft_slo_s=spec.slo.ttft_s,
        tpot_slo_s=spec.slo.tpot_s, allowed_vendors=tuple(spec.allowed_vendors),
        allowed_accelerators=tuple(spec.allowed_accelerators),
        min_replicas=spec.min_replicas, max_replicas=spec.max_replicas,
        pinned=spec.pinned, placements=tuple(copies))


def build_view(devices: dict[str, DeviceSpec], stats: dict[str, dict],
               specs: dict[str, ModelSpec], demand: dict[str, Demand]) -> ClusterView:
    live = [devices[d] for d in sorted(stats) if d in devices]
    where = placements(stats)
    return ClusterView(
        devices=tuple(device_view(d) for d in live),
        models=tuple(model_view(specs[n], where.get(n, [])) for n in sorted(specs)),
        demand=demand)
