"""Properties of every policy over random fleets and catalogs.

Each example runs the loop the controller and the simulator run:
``actions = decide(view, t); view = apply_all(view, actions)``, round after
round, time advancing and demand held fixed (models with a rate keep
arriving, so their ``last_used`` follows the clock).
"""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import (ACTIVE, ClusterView, Demand, DeviceView, Load, Migrate, ModelView,
                      Park, RequestCapacity, Swap, Unload, apply_all, is_valid,
                      make_policy)

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
ACCELERATORS = {"nvidia": ("H100", "A10"), "amd": ("MI300",)}
POLICY_NAMES = ("default", "dedicated", "lru")
DT_S = 100.0  # idle_unload_s (600) passes after six rounds


# --- generators -----------------------------------------------------------------

@st.composite
def fleets(draw, uniform_slots: bool = False):
    devices = []
    for i in range(draw(st.integers(1, 6))):
        vendor = draw(st.sampled_from(sorted(ACCELERATORS)))
        mem = (40 * draw(st.integers(1, 3)) + 5 if uniform_slots
               else draw(st.sampled_from([60, 100, 160, 240])))
        devices.append(DeviceView(
            id=f"d{i}", node=f"n{i // 2}", vendor=vendor,
            accelerator_type=draw(st.sampled_from(ACCELERATORS[vendor])), memory_bytes=mem,
            speed=draw(st.sampled_from([1.0, 2.0, 4.0])),
            cost_per_hour=draw(st.sampled_from([0.5, 1.0, 3.0]))))
    return tuple(devices)


RATES = [0.0, 0.0, 0.05, 0.3, 0.8, 3.0, 12.0]


@st.composite
def catalogs(draw, constrained: bool = True):
    """(models without placements, fixed demand as name -> (rate, queue, last_used))."""
    models, demand = [], {}
    for i in range(draw(st.integers(1, 10))):
        name = f"m{i}"
        kw = {}
        if constrained:
            kw = dict(allowed_vendors=draw(st.sampled_from([(), (), ("nvidia",), ("amd",)])),
                      allowed_accelerators=draw(st.sampled_from([(), (), (), ("H100",)])),
                      min_replicas=draw(st.sampled_from([0, 0, 0, 1])),
                      pinned=draw(st.sampled_from([False] * 5 + [True])))
        models.append(ModelView(
            name=name, family=draw(st.sampled_from("fgh")),
            weights_bytes=draw(st.sampled_from([20, 30, 50, 80])) if constrained else 30,
            kv_cache_bytes=10, max_replicas=draw(st.integers(1, 3)), **kw))
        rate, queue = draw(st.sampled_from(RATES)), draw(st.sampled_from([0, 0, 3]))
        demand[name] = (rate, queue, draw(st.sampled_from([float("-inf"), 0.0])))
    return tuple(models), demand


def seeded(draw, devices, models, busy: bool = False) -> ClusterView:
    """Random valid starting placements: at most one copy per model; with
    ``busy``, some active copies have requests in flight (for good: demand
    is fixed, so they never finish)."""
    view = ClusterView(devices, models)
    for m in models:
        d = draw(st.sampled_from([None, *devices]))
        if d is not None:
            a = Load(m.name, d.id, park=draw(st.booleans()))
            if is_valid(view, a):
                view = apply_all(view, [a])
    if busy:
        view = ClusterView(view.devices, tuple(
            replace(m, placements=tuple(
                replace(p, inflight=draw(st.sampled_from([0, 0, 2]))) if p.state == ACTIVE else p
                for p in m.placements))
            for m in view.models))
    return view


def with_demand(view: ClusterView, demand, now: float) -> ClusterView:
    """The fixed demand at ``now``; in-flight counts follow the copies."""
    inflight = {m.name: sum(p.inflight for p in m.placements) for m in view.models}
    return ClusterView(view.devices, view.models, {
        n: Demand(rate=r, queue=q, inflight=inflight.get(n, 0),
                  last_used=now if (r or q or inflight.get(n)) else last)
        for n, (r, q, last) in demand.items()})


# --- the loop and its invariants --------------------------------------------------

def check_invariants(before: ClusterView, actions, after: ClusterView) -> None:
    for d in after.devices:
        assert after.used_bytes(d.id) <= d.memory_bytes, f"over-commit on {d.id}"
    for m in after.models:
        devices = [p.device for p in m.placements]
        assert len(devices) == len(set(devices)), f"duplicate placement of {m.name}"
        for p in m.placements:
            assert m.allowed_on(after.device(p.device)), f"{m.name} on disallowed {p.device}"
    for a in actions:
        name = a.replace if isinstance(a, Swap) else getattr(a, "model", None)
        if isinstance(a, (Park, Unload, Migrate, Swap)):
            assert not before.model(name).pinned, f"pinned model moved out: {a}"


def run(policy_name: str, view: ClusterView, demand, rounds: int):
    """Yields (view the policy saw, its actions) per round; checks every round."""
    policy = make_policy(policy_name)
    t = 0.0
    for _ in range(rounds):
        t += DT_S
        view = with_demand(view, demand, t)
        actions = policy.decide(view, t)
        assert policy.decide(view, t) == actions, "not deterministic"
        assert make_policy(policy_name).decide(view, t) == actions, "hidden state"
        after = apply_all(view, actions)  # raises InvalidAction on any broken rule
        check_invariants(view, actions, after)
        yield view, actions
        view = after


def changes(actions) -> list:
    return [a for a in actions if not isinstance(a, RequestCapacity)]


# --- properties ----------------------------------------------------------------------

@SETTINGS
@given(data=st.data(), fleet=fleets(), catalog=catalogs(), policy=st.sampled_from(POLICY_NAMES))
def test_safety_under_every_policy(data, fleet, catalog, policy):
    """Never over-commit, never break a vendor or accelerator constraint,
    never move a pinned model, never drop below min_replicas (default)."""
    models, demand = catalog
    view = seeded(data.draw, fleet, models, busy=True)
    prev = None
    for seen, actions in run(policy, view, demand, rounds=10):
        if policy == "default" and prev is not None:
            for m in seen.models:
                was = len(prev.model(m.name).on(ACTIVE))
                assert len(seen.model(m.name).on(ACTIVE)) >= min(was, m.min_replicas)
        prev = seen


@SETTINGS
@given(data=st.data(), fleet=fleets(uniform_slots=True), catalog=catalogs(constrained=False),
       policy=st.sampled_from(["default", "lru"]))
def test_requested_models_become_active_when_capacity_exists(data, fleet, catalog, policy):
    """Uniform footprints, no constraints, no pinning, one max replica, and
    at least as many engine slots as models with any demand: every model
    with queued requests is active after the first round and stays so; the
    default policy then goes quiet (no actions at all) once idle models have
    timed out (round 6) and consolidation has run (a device a round)."""
    models, demand = catalog[0], dict(catalog[1])
    slots = sum(d.memory_bytes // 40 for d in fleet)
    wanted = [n for n, (r, q, _) in demand.items() if r or q]
    queued = [n for n, (_, q, _) in demand.items() if q]
    if len(wanted) > slots:  # trim demand to capacity instead of discarding the example
        for n in wanted[slots:]:
            demand[n] = (0.0, 0, float("-inf"))
        queued = [n for n in queued if n in wanted[:slots]]
    models = tuple(ModelView(m.name, m.family, m.weights_bytes, m.kv_cache_bytes) for m in models)
    view = seeded(data.draw, fleet, models)
    history = list(run(policy, view, demand, rounds=20))
    for seen, actions in history[1:]:
        for n in queued:
            assert seen.model(n).on(ACTIVE), f"{n} still not active"
    if policy == "default":
        assert all(actions == [] for _, actions in history[-4:]), [a for _, a in history]


@SETTINGS
@given(data=st.data(), fleet=fleets(), catalog=catalogs())
def test_default_policy_converges_and_does_not_thrash(data, fleet, catalog):
    """Steady demand: the default policy settles (only repeated capacity
    requests, no state change) and the changes over the run are bounded."""
    models, demand = catalog
    view = seeded(data.draw, fleet, models, busy=True)
    history = list(run("default", view, demand, rounds=20))
    tail = [actions for _, actions in history[-6:]]
    assert all(changes(a) == [] for a in tail), tail
    assert all(a == tail[0] for a in tail)
    settled, asked = history[-1][0], {a.for_model for a in tail[0]}
    for m in settled.models:  # min_replicas met, or capacity asked for
        assert len(m.on(ACTIVE)) >= m.min_replicas or m.name in asked, m
    total = sum(len(changes(a)) for _, a in history)
    # Generous (fuzzed runs use at most a third of it); a thrashing policy
    # would instead grow with the number of rounds.
    assert total <= 4 * len(models) + 2 * len(fleet), total


@SETTINGS
@given(data=st.data(), fleet=fleets(), catalog=catalogs(), policy=st.sampled_from(POLICY_NAMES),
       seed=st.integers(0, 2**16))
def test_decisions_do_not_depend_on_listing_order(data, fleet, catalog, policy, seed):
    """Same cluster listed in another order: the same actions."""
    models, demand = catalog
    view = with_demand(seeded(data.draw, fleet, models, busy=True), demand, 1000.0)
    rng = random.Random(seed)
    shuffled = lambda xs: tuple(rng.sample(xs, len(xs)))
    other = ClusterView(shuffled(view.devices),
                        shuffled([ModelView(**{**m.__dict__, "placements": shuffled(m.placements)})
                                  for m in view.models]),
                        view.demand)
    assert make_policy(policy).decide(view, 1000.0) == make_policy(policy).decide(other, 1000.0)
