"""What ``/admin/status`` and ``shoal status`` say of a model and a device.

Pure functions of the workers' typed stats, so a model's state and its
placements are derived from the same copies and cannot contradict: a model
is ``active`` exactly when one of its copies is routable (an active copy, or
a time-share member, which serves while parked).
"""

from __future__ import annotations

from collections import Counter

from cluster.catalog import ModelSpec
from cluster.engine.contract import ModelState, ModelStatus, WorkerStats
from cluster.engine.device import DeviceSpec
from policies.view import Demand

# Model-level states, from its copies: the first that applies.
ACTIVE, LOADING, PARKED, COLD = "active", "loading", "parked", "cold"


def model_state(copies: dict[str, ModelStatus]) -> str:
    if any(c.routable for c in copies.values()):
        return ACTIVE
    states = {c.state for c in copies.values()}
    if ModelState.LOADING in states:
        return LOADING
    if states & {ModelState.PARKED, ModelState.TIMESHARED, ModelState.ACTIVE}:
        return PARKED  # held on a device (draining or parked), not serving now
    return COLD


def model_status(spec: ModelSpec, copies: dict[str, ModelStatus], replicas: int,
                 demand: Demand, problem: str | None) -> dict:
    return {"name": spec.name, "family": spec.family, "state": model_state(copies),
            "devices": {dev: str(c.state) for dev, c in copies.items()},
            # Per copy: time-shared or not, and its smoothed latencies.
            "latency": {dev: {"timeshared": c.timeshared, "ttft_s": c.ttft_s,
                              "tpot_s": c.tpot_s}
                        for dev, c in copies.items()},
            "replicas": replicas, "queue": demand.queue, "inflight": demand.inflight,
            "rate": round(demand.rate, 4), "problem": problem}


def device_status(d: DeviceSpec, stats: WorkerStats | None) -> dict:
    models = stats.models if stats is not None else {}
    return {"id": d.id, "node": d.node_id, "vendor": d.vendor, "kind": d.kind,
            "accelerator_type": d.accelerator_type, "speed": d.speed,
            "cost_per_hour": d.cost_per_hour, "alive": stats is not None,
            "memory_used_bytes": stats.device.memory_used_bytes if stats else None,
            "memory_budget_bytes": d.memory_bytes,
            "models": sorted(models),
            # How many copies are in each state: readable with 60 models too.
            "model_states": dict(sorted(Counter(str(m.state) for m in models.values()).items()))}
