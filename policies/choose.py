"""Small, pure questions about devices that every policy asks.

What is on a device, does a model fit, and in which order to try devices.
Orderings always end in the device id, so every choice is deterministic.
"""

from __future__ import annotations

from policies.view import ACTIVE, LOADING, PARKED, ClusterView, DeviceView, ModelView

IN_MEMORY = (LOADING, ACTIVE)  # states that hold device memory


def in_memory(view: ClusterView, device_id: str) -> tuple[ModelView, ...]:
    """Models holding memory on ``device_id`` (active or loading)."""
    return view.residents(device_id, *IN_MEMORY)


def is_empty(view: ClusterView, device_id: str) -> bool:
    """No copy holds memory there. Parked copies don't count: they cost no
    device memory, and a device holding only them can serve a new engine."""
    return not in_memory(view, device_id)


def alone_on(view: ClusterView, m: ModelView) -> bool:
    """Does ``m`` have an active copy that has its whole device to itself?"""
    return any([x.name for x in in_memory(view, d)] == [m.name] for d in m.on(ACTIVE))


def swap_ready(view: ClusterView, m: ModelView) -> bool:
    """Is ``m`` parked on an allowed device where a same-family model is
    active? Then a request for it is one in-place swap (ms) away."""
    return any(m.allowed_on(view.device(d)) and
               any(x.family == m.family and x.placement(d).state == ACTIVE
                   for x in in_memory(view, d) if x.name != m.name)
               for d in m.on(PARKED))


def timeshare_served(m: ModelView) -> bool:
    """Does a device time-share ``m`` within its TPOT SLO (as far as
    measured)? Then it needs no copy in memory of its own. Over the SLO, the
    device is overloaded and ``m`` must get a copy elsewhere."""
    return any(p.timeshared and (p.tpot_s is None or p.tpot_s <= m.tpot_slo_s)
               for p in m.placements)


def swappable_on(m: ModelView) -> set[str]:
    """Devices where ``m`` is parked and a policy swap or wake would act;
    a time-shared copy's swaps are its device scheduler's, not the policy's."""
    return {p.device for p in m.placements if p.state == PARKED and not p.timeshared}


def fits(view: ClusterView, m: ModelView, d: DeviceView) -> bool:
    """Could one more active copy of ``m`` go on ``d`` right now?"""
    return m.allowed_on(d) and view.free_bytes(d.id) >= m.footprint


def leftover(view: ClusterView, m: ModelView, d: DeviceView) -> int:
    """Free bytes ``d`` would keep after an active copy of ``m`` (best fit = smallest)."""
    return view.free_bytes(d.id) - m.footprint


def hosts_family(view: ClusterView, m: ModelView, d: DeviceView) -> bool:
    """Is another model of ``m``'s family active on ``d`` (a later swap is in place)?"""
    return any(x.family == m.family and x.name != m.name for x in in_memory(view, d.id))


def cheap_first(d: DeviceView) -> tuple:
    """Cheapest device, then fastest."""
    return (d.cost_per_hour, -d.speed, d.id)


def capacity_rps(view: ClusterView, device_ids, per_replica_rps: float) -> float:
    """Requests per second the active copies on ``device_ids`` can serve: a
    device of speed ``s`` serves ``s`` times the reference replica rate."""
    return sum(per_replica_rps * view.device(d).speed for d in device_ids)
