"""How a model with no active copy gets one: a ladder, cheapest step first.

1. swap  - it is parked where a same-family model sits idle: an in-place
           weight swap (milliseconds, no new engine);
2. wake  - it is parked on a device with room: the weights are already in
           that node's host memory;
3. park-load + swap - a same-family model sits idle on an allowed device:
           stage the weights in its host cache, then swap in place. This is
           how cold families end up co-located on one engine;
4. load  - some allowed device has room: a new engine on the best one.
           Hot or big models (``fast``) take this step before step 3: they
           want an engine of their own, cold ones would rather share one
           than start an engine and hold another device's memory;
5. evict - make room on one device by taking out less-wanted idle models;
6. ask   - RequestCapacity: nothing here may give way (only when the
           caller says the need is urgent: requests waiting, a hot model,
           or min_replicas unmet).

Steps 1, 3 and 5 only ever displace an idle copy (nothing in flight on it,
nothing queued for its model) of an unpinned model above its
``min_replicas``, and one whose ``demand_key`` is strictly lower than the
requester's. A strict order on a steady demand means displacement cannot
cycle. One exception, on purpose: a requester with requests waiting may
swap out any idle cold same-family model (steps 1 and 3), or evict any idle
cold copy (step 5): a model with requests waiting is never starved by an
idle one. That is Shoal's
time-sharing: a swap costs milliseconds, and the model swapped out rests
parked beside the engine, one swap from coming back when its own requests
arrive, so it has nothing to do until then (no cycle under steady demand).

Evicted copies are parked when their model still has any demand (it is
likely back soon, and from host memory the return is a wake or a swap, not a
disk read) and unloaded when it has none (nothing worth keeping warm).
"""

from __future__ import annotations

from functools import partial

from policies.actions import (EVICTION_REASON, Action, Load, Park, RequestCapacity, Swap,
                              Unload, Wake)
from policies.choose import hosts_family, in_memory, is_empty, leftover, swappable_on
from policies.classify import Heat, demand_key, eviction_order, has_demand
from policies.plan import Planner
from policies.view import ACTIVE, PARKED, ClusterView, DeviceView, ModelView, Placement


def device_key(view: ClusterView, m: ModelView, d: DeviceView, fast: bool,
               hot_devices: frozenset[str]) -> tuple:
    """Where ``m`` would rather go, smallest first.

    Hot or big models (``fast``): an empty device, the fastest, then the
    tightest fit. Cold small ones: away from hot models (which want their
    device to themselves), the cheapest, next to their family (later swaps
    are in place), then the tightest fit (bin packing).
    """
    if fast:
        return (not is_empty(view, d.id), -d.speed, leftover(view, m, d), d.cost_per_hour, d.id)
    return (d.id in hot_devices, d.cost_per_hour, not hosts_family(view, m, d),
            leftover(view, m, d), d.id)


def may_displace(view: ClusterView, m: ModelView, victim: ModelView, device: str,
                 outranked: bool = True) -> bool:
    """May ``m`` take ``victim``'s active copy on ``device`` out of service?
    Only an idle copy (nothing in flight on it, nothing queued for its model)
    of an unpinned model above its ``min_replicas``, and (``outranked``) only
    if the victim is strictly less wanted."""
    p = victim.placement(device)
    return (victim.name != m.name and not victim.pinned
            and p is not None and p.state == ACTIVE and p.inflight == 0
            and view.demand_of(victim.name).queue == 0
            and len(victim.on(ACTIVE)) > victim.min_replicas
            and (not outranked or demand_key(view, victim.name) < demand_key(view, m.name)))


def acquire(plan: Planner, m: ModelView, heat: Heat, fast: bool, ask: bool = True,
            engine_rps: float = 0.0, max_members: int = 0, headroom: float = 1.0,
            busy_s: float = 30.0) -> None:
    """Give ``m`` (which has no copy in memory) an active copy; failing that,
    ask for capacity if ``ask`` (the caller says whether the need is urgent).
    ``fast``: order devices for a hot or big model. With ``engine_rps`` (the
    requests per second one engine serves on a speed-1.0 device) and
    ``max_members``, a model that is not hot first tries to join a
    time-shared engine of its family (``join``); a hot one wants its own."""
    if m.name not in heat.hot and max_members > 0 and \
            join(plan, m, engine_rps, max_members, headroom, busy_s):
        return
    evict = partial(_evict, busy_s=busy_s)
    ladder = (_swap, _wake, _load, _load_and_swap, evict) if fast \
        else (_swap, _wake, _load_and_swap, _load, evict)
    for step in ladder:
        if step(plan, m, heat, fast):
            return
    if ask:
        plan.do(capacity_request(m, "no device can take it and nothing may give way", fast))


def join(plan: Planner, m: ModelView, engine_rps: float, max_members: int,
         headroom: float = 1.0, busy_s: float = 30.0) -> bool:
    """Join a time-shared engine of ``m``'s family: on a device that
    time-shares, a ``Load`` (parked: it holds no device memory) of a model
    whose family has an engine there makes it a member taking turns on that
    engine (``cluster/engine/timeshare.py``): no engine start, no memory, no
    eviction. A device takes it only while its members' measured TTFT and
    TPOT stay, on average, within ``headroom`` times their SLOs, while the models expected
    busy there at once stay within ``max_members`` (all families: they share
    the device's compute; a model at rate r counts min(1, r * busy_s), so a
    rarely used one counts for little), and while its demand fits (one engine
    serves ``engine_rps`` times the device's speed); the least loaded first."""
    view = plan.view
    best = None
    for d in view.devices:
        if not m.allowed_on(d) or m.placement(d.id) is not None:
            continue
        here = view.residents(d.id)
        members = [(x, x.placement(d.id)) for x in here
                   if x.family == m.family and x.placement(d.id).timeshared]
        if not members or _over(members, "tpot_s", "tpot_slo_s", headroom) or \
                _over(members, "ttft_s", "ttft_slo_s", headroom):
            continue
        # Every copy there counts: joins planned this round are not members yet.
        busy = sum(min(1.0, view.demand_of(x.name).rate * busy_s) for x in here)
        if busy + min(1.0, view.demand_of(m.name).rate * busy_s) > max_members:
            continue
        load = sum(view.demand_of(x.name).rate for x in here)
        if load + view.demand_of(m.name).rate > engine_rps * d.speed:
            continue
        key = (load / d.speed, d.cost_per_hour, d.id)
        if best is None or key < best[0]:
            best = (key, d)
    if best is None:
        return False
    plan.do(Load(m.name, best[1].id, park=True,
                 reason=f"{m.name} wanted; joins the time-shared {m.family} engine on "
                        f"{best[1].id}"))
    return True


def _over(members: list[tuple[ModelView, Placement]], measured: str, slo: str,
          headroom: float) -> bool:
    """Is the members' mean measured latency, relative to their SLOs, above ``headroom``?"""
    ratios = [getattr(p, measured) / getattr(x, slo) for x, p in members
              if getattr(p, measured) is not None]
    return bool(ratios) and sum(ratios) / len(ratios) > headroom


def capacity_request(m: ModelView, why: str, fast: bool = False) -> RequestCapacity:
    return RequestCapacity(m.footprint, m.allowed_vendors, m.allowed_accelerators, m.name,
                           fast, reason=f"{m.name}: {why}")


def _swap_partner(view: ClusterView, m: ModelView, d: DeviceView,
                  heat: Heat) -> ModelView | None:
    """The least wanted same-family model ``m`` may swap out on ``d``: one
    whose engine is big enough (a family may vary in KV reservation) and
    that is less wanted, or any idle cold one if ``m`` has requests waiting."""
    free = view.free_bytes(d.id)
    waiting = view.demand_of(m.name).queue > 0
    # Not a time-share member: a swap into its engine is a join (``join``).
    partners = [r for r in in_memory(view, d.id)
                if r.family == m.family and free + r.footprint >= m.footprint
                and not r.placement(d.id).timeshared
                and may_displace(view, m, r, d.id, outranked=not waiting or r.name in heat.hot)]
    return min(partners, key=lambda r: eviction_order(view, r.name), default=None)


def _allowed(view: ClusterView, m: ModelView, heat: Heat, fast: bool, pred) -> list[DeviceView]:
    """Devices ``m`` may use that satisfy ``pred``, best first."""
    hot = heat.hot_devices(view)
    ds = [d for d in view.devices if m.allowed_on(d) and pred(d)]
    return sorted(ds, key=lambda d: device_key(view, m, d, fast, hot))


def _swap(plan: Planner, m: ModelView, heat: Heat, fast: bool) -> bool:
    parked = swappable_on(m)
    for d in _allowed(plan.view, m, heat, fast, lambda d: d.id in parked):
        r = _swap_partner(plan.view, m, d, heat)
        if r is not None:
            plan.do(Swap(m.name, d.id, r.name,
                         reason=f"{m.name} wanted; {r.name} idle in a same-family engine"))
            return True
    return False


def _wake(plan: Planner, m: ModelView, heat: Heat, fast: bool) -> bool:
    parked = swappable_on(m)
    room = plan.view.free_bytes
    for d in _allowed(plan.view, m, heat, fast,
                      lambda d: d.id in parked and room(d.id) >= m.footprint):
        plan.do(Wake(m.name, d.id, reason=f"{m.name} wanted; parked on a device with room"))
        return True
    return False


def _load(plan: Planner, m: ModelView, heat: Heat, fast: bool) -> bool:
    room = plan.view.free_bytes
    for d in _allowed(plan.view, m, heat, fast,
                      lambda d: m.placement(d.id) is None and room(d.id) >= m.footprint):
        plan.do(Load(m.name, d.id, reason=f"{m.name} wanted; room on {d.id}"))
        return True
    return False


def _load_and_swap(plan: Planner, m: ModelView, heat: Heat, fast: bool) -> bool:
    for d in _allowed(plan.view, m, heat, fast, lambda d: m.placement(d.id) is None):
        r = _swap_partner(plan.view, m, d, heat)
        if r is not None:
            why = f"{m.name} wanted; co-locate with its family, {r.name} idle"
            plan.do(Load(m.name, d.id, park=True, reason=why),
                    Swap(m.name, d.id, r.name, reason=why))
            return True
    return False


def _evict(plan: Planner, m: ModelView, heat: Heat, fast: bool, busy_s: float = 30.0) -> bool:
    view, hot = plan.view, heat.hot_devices(plan.view)
    best: tuple | None = None
    for d in view.devices:
        p = m.placement(d.id)
        if not m.allowed_on(d) or (p is not None and p.state != PARKED):
            continue
        victims = _victims_on(view, m, d, heat.hot, busy_s)
        if victims is not None:
            worst = max(eviction_order(view, v.name) for v in victims)
            key = (worst, len(victims), device_key(view, m, d, fast, hot))
            if best is None or key < best[0]:
                best = (key, d, victims)
    if best is None:
        return False
    _, d, victims = best
    actions: list[Action] = []
    for v in victims:
        why = f"{EVICTION_REASON} {m.name}, which is wanted more"
        # Parked, a time-share member would stay a member: it leaves instead.
        keep = has_demand(view.demand_of(v.name)) and not v.placement(d.id).timeshared
        actions.append(Park(v.name, d.id, reason=why) if keep else Unload(v.name, d.id, reason=why))
    if m.placement(d.id) is not None:
        actions.append(Wake(m.name, d.id, reason=f"{m.name} wanted; room made"))
    else:
        actions.append(Load(m.name, d.id, reason=f"{m.name} wanted; room made"))
    plan.do(*actions)
    return True


def _victims_on(view: ClusterView, m: ModelView, d: DeviceView,
                hot: frozenset[str], busy_s: float = 30.0) -> list[ModelView] | None:
    """The least-wanted models on ``d``, taken in eviction order until ``m``
    fits, or None if even all of them would not make room."""
    need = m.footprint - view.free_bytes(d.id)
    chosen: list[ModelView] = []
    # Requests waiting outrank an idle cold copy: otherwise a model with a
    # long history could starve a newcomer for ever. Otherwise (and for hot
    # victims) only a strictly less-wanted model gives way: no ping-pong.
    waiting = view.demand_of(m.name).queue > 0
    candidates = [v for v in in_memory(view, d.id)
                  if may_displace(view, m, v, d.id, outranked=not waiting or v.name in hot)]
    for v in sorted(candidates, key=lambda v: eviction_order(view, v.name)):
        if need <= 0:
            break
        if v.placement(d.id).timeshared:
            # A time-shared engine frees its memory only when its last member
            # leaves: the whole group goes, or none of it.
            group = _idle_group(view, m, v, d, waiting, busy_s)
            if group is None:
                continue
            chosen += group
        else:
            chosen.append(v)
        need -= v.footprint
    return chosen if need <= 0 and chosen else None


def _idle_group(view: ClusterView, m: ModelView, v: ModelView, d: DeviceView, waiting: bool,
                busy_s: float) -> list[ModelView] | None:
    """Every member of the time-shared engine ``v`` is in, ``v`` first, if all
    are idle and unpinned, and together less wanted than ``m`` (their rates
    summed: one newcomer does not displace a busy family) or, if ``m`` has
    requests waiting, used so rarely that together they keep less than one
    model busy (rate x ``busy_s``): the waiting-requester rule for one idle
    copy, for a whole engine."""
    members = [x for x in view.residents(d.id)
               if x.family == v.family and x.placement(d.id).timeshared]
    for x in members:
        if x.pinned or x.placement(d.id).inflight or view.demand_of(x.name).queue or \
                len(x.on(ACTIVE, PARKED)) <= x.min_replicas:
            return None
    rate = sum(view.demand_of(x.name).rate for x in members)
    if rate >= view.demand_of(m.name).rate and not (waiting and rate * busy_s < 1.0):
        return None
    return [v] + [x for x in members if x.name != v.name]
