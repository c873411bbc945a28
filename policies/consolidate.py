"""Quiet-round tidying: give hot models whole devices, free whole devices.

Runs only in a round that produced no other action, so it never competes
with serving demand. Each step strictly improves one of two measures and no
other step undoes it, which is why it cannot oscillate:

- a hot model sharing a device moves to an empty device at least as fast
  (one more hot model has a device to itself);
- all active copies on one device move onto devices already in use, so the
  device empties (one fewer occupied device). The targets never include a
  device holding a hot model, so this never undoes the first step, and it
  is skipped if it would take the engine away from a wanted model parked
  beside it (that model would wake on the emptied device right away).

Occupied means holding device memory: parked copies cost none and do not
count. Pinned models and copies still loading never move.
"""

from __future__ import annotations

from policies.actions import Migrate
from policies.choose import (IN_MEMORY, fits, hosts_family, in_memory, is_empty, leftover,
                             swap_ready)
from policies.classify import Heat, has_demand
from policies.plan import Planner
from policies.view import ACTIVE, PARKED, ClusterView, DeviceView, ModelView


def give_hot_whole_devices(plan: Planner, heat: Heat) -> None:
    """Migrate each hot copy that shares its device to an empty, allowed,
    at-least-as-fast device (fastest, then cheapest, then tightest)."""
    for name in sorted(heat.hot):
        for src in sorted(plan.view.model(name).on(ACTIVE)):
            view, m = plan.view, plan.view.model(name)
            if m.pinned or [x.name for x in in_memory(view, src)] == [name]:
                continue
            speed = view.device(src).speed
            targets = [d for d in view.devices
                       if d.id != src and d.speed >= speed and is_empty(view, d.id)
                       and _can_take(view, m, d)]
            if targets:
                t = min(targets, key=lambda d: (-d.speed, d.cost_per_hour,
                                                leftover(view, m, d), d.id))
                plan.do(Migrate(name, src, t.id, reason=f"hot {name} gets {t.id} to itself"))


def empty_one_device(plan: Planner, heat: Heat) -> None:
    """Move every active copy off one device onto devices already in use.

    Tries devices most expensive first (then least used), and empties at
    most one per round: the next round sees the result and may do another.
    """
    view = plan.view
    occupied = [d for d in view.devices if not is_empty(view, d.id)]
    order = sorted(occupied, key=lambda d: (-d.cost_per_hour, view.used_bytes(d.id), d.id))
    hot_devices = heat.hot_devices(view)
    for d in order:
        trial = Planner(view)
        if _move_all_off(trial, d, heat, hot_devices) and not _strands(view, trial.view):
            plan.do(*trial.actions)
            return


def _move_all_off(trial: Planner, d: DeviceView, heat: Heat, hot_devices: frozenset[str]) -> bool:
    residents = in_memory(trial.view, d.id)
    # A time-shared engine stays while any member is left: moving its
    # current member empties nothing.
    if any(m.pinned or m.name in heat.hot or m.placement(d.id).state != ACTIVE
           or m.placement(d.id).timeshared for m in residents):
        return False
    # Biggest first: first-fit-decreasing packs better than arrival order.
    for m in sorted(residents, key=lambda m: (-m.footprint, m.name)):
        view = trial.view
        targets = [t for t in view.devices
                   if t.id != d.id and t.id not in hot_devices
                   and not is_empty(view, t.id) and _can_take(view, m, t)]
        if not targets:
            return False
        t = min(targets, key=lambda t: (leftover(view, m, t), not hosts_family(view, m, t),
                                        t.cost_per_hour, t.id))
        trial.do(Migrate(m.name, d.id, t.id, reason=f"consolidate: empty {d.id}"))
    return True


def _strands(before: ClusterView, after: ClusterView) -> bool:
    """Would a wanted model resting parked one swap away from its family's
    engine lose that engine? It would then wake on the emptied device at
    once, undoing the move."""
    return any(has_demand(before.demand_of(m.name)) and swap_ready(before, m)
               and not swap_ready(after, after.model(m.name))
               for m in before.models if not m.on(*IN_MEMORY))


def _can_take(view: ClusterView, m: ModelView, t: DeviceView) -> bool:
    """Allowed, room for one more copy, and no copy there other than a parked
    one (which the migration wakes)."""
    p = m.placement(t.id)
    return fits(view, m, t) and (p is None or p.state == PARKED)
