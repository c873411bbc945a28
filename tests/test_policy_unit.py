"""Policies on hand-built views with an injected clock: no Ray, no vLLM.

Memory is in abstract units (a device of 100 holds two models of 40).
"""

from __future__ import annotations

import math

import pytest

from policies import (ACTIVE, PARKED, ClusterView, DedicatedPolicy, DefaultConfig, DefaultPolicy,
                      Demand, DemandEstimator, DeviceView, InvalidAction, Load,
                      LRUScaleToZeroPolicy, Migrate, ModelView, Park, Placement, RequestCapacity,
                      ScaleIn, ScaleOut, Swap, Unload, Wake, apply, apply_all, make_policy)
from policies.classify import Heat

NOW = 1000.0


def dev(id, mem=100, vendor="nvidia", acc="H100", speed=1.0, cost=1.0):
    return DeviceView(id=id, node=f"node-{id}", vendor=vendor, accelerator_type=acc,
                      memory_bytes=mem, speed=speed, cost_per_hour=cost)


def mdl(name, *placements, family="llama", size=40, **kw):
    """A model whose footprint is ``size``; placements as ("d0", state[, inflight])."""
    ps = tuple(Placement(p[0], p[1] if len(p) > 1 else ACTIVE, p[2] if len(p) > 2 else 0)
               for p in placements)
    return ModelView(name=name, family=family, weights_bytes=size, kv_cache_bytes=0,
                     placements=ps, **kw)


def wants(rate=0.1, queue=0, inflight=0, last_used=NOW):
    return Demand(rate=rate, queue=queue, inflight=inflight, last_used=last_used)


def cluster(devices, models, **demand):
    return ClusterView(tuple(devices), tuple(models), demand)


def decide(view, policy=None, now=NOW):
    policy = policy or DefaultPolicy()
    actions = policy.decide(view, now)
    assert policy.decide(view, now) == actions  # deterministic
    apply_all(view, actions)  # and valid
    return actions


def state(view, model, device):
    p = view.model(model).placement(device)
    return p.state if p else None


# --- plan.apply ----------------------------------------------------------------

class TestApply:
    base = cluster([dev("d0"), dev("d1", vendor="amd", acc="MI300")],
                   [mdl("a", ("d0",)), mdl("b", ("d0", PARKED)), mdl("q", family="qwen"),
                    mdl("big", size=70), mdl("huge", size=150),
                    mdl("p", ("d1",), pinned=True)])

    @pytest.mark.parametrize("action, message", [
        (Load("big", "d0"), "over-commit"),
        (Load("a", "d0"), "duplicate placement"),
        (Load("huge", "d0", park=True), "could never become active"),
        (Load("x", "d0"), "unknown model"),
        (Load("a", "d9"), "unknown device"),
        (Swap("q", "d0", "a"), "families differ"),
        (Swap("big", "d0", "a"), "no copy"),
        (Swap("b", "d0", "b"), "cannot replace itself"),
        (Wake("a", "d0"), "is active"),
        (Wake("big", "d0"), "no copy"),
        (Park("b", "d0"), "is parked"),
        (Park("p", "d1"), "pinned"),
        (Unload("p", "d1"), "pinned"),
        (Unload("a", "d1"), "no copy"),
        (ScaleOut("big", "d0"), "over-commit"),
        (ScaleIn("a", "d0"), "last active copy"),
        (Migrate("a", "d0", "d0"), "same device"),
        (Migrate("p", "d1", "d0"), "pinned"),
        (Migrate("b", "d0", "d1"), "is parked"),
        (RequestCapacity(0), "positive"),
    ])
    def test_invalid(self, action, message):
        with pytest.raises(InvalidAction, match=message):
            apply(self.base, action)

    def test_errors_name_the_action_and_rule(self):
        view = cluster([dev("d0")], [mdl("a", ("d0",)), mdl("big", size=70)])
        with pytest.raises(InvalidAction) as e:
            apply(view, Load("big", "d0"))
        assert str(e.value) == ("Load(model='big', device='d0', park=False): over-commit: "
                                "'d0' has 60 free bytes, 'big' needs 70")
        assert isinstance(e.value, ValueError)

    def test_vendor_and_accelerator(self):
        view = cluster([dev("n", acc="A10"), dev("m", vendor="amd", acc="MI300")],
                       [mdl("a", allowed_vendors=("amd",)),
                        mdl("b", allowed_accelerators=("H100",))])
        with pytest.raises(InvalidAction, match="not allowed on 'n'"):
            apply(view, Load("a", "n"))
        with pytest.raises(InvalidAction, match="not allowed"):
            apply(view, Load("a", "n", park=True))
        for d in ("n", "m"):
            with pytest.raises(InvalidAction, match="not allowed"):
                apply(view, Load("b", d))
        assert state(apply(view, Load("a", "m")), "a", "m") == ACTIVE

    def test_swap_rules(self):
        view = cluster([dev("d0")], [mdl("a", ("d0", ACTIVE, 1)), mdl("b", ("d0", PARKED)),
                                     mdl("q", ("d0", PARKED), family="qwen")])
        with pytest.raises(InvalidAction, match="in-flight"):
            apply(view, Swap("b", "d0", "a"))
        with pytest.raises(InvalidAction, match="families differ"):
            apply(view, Swap("q", "d0", "a"))
        pinned = cluster(view.devices, [mdl("a", ("d0",), pinned=True), view.models[1]])
        with pytest.raises(InvalidAction, match="pinned"):
            apply(pinned, Swap("b", "d0", "a"))
        wider = cluster([dev("d0", mem=50)], [mdl("a", ("d0",)), mdl("b", ("d0", PARKED), size=60)])
        with pytest.raises(InvalidAction, match="over-commit"):  # same family, bigger KV
            apply(wider, Swap("b", "d0", "a"))
        idle = cluster(view.devices, [mdl("a", ("d0",)), *view.models[1:]])
        after = apply(idle, Swap("b", "d0", "a"))
        assert (state(after, "a", "d0"), state(after, "b", "d0")) == (PARKED, ACTIVE)
        assert after.used_bytes("d0") == idle.used_bytes("d0")

    def test_park_wake_unload_scale_migrate(self):
        view = cluster([dev("d0"), dev("d1")],
                       [mdl("a", ("d0", ACTIVE, 2)), mdl("b", ("d1", PARKED))])
        for action in (Park("a", "d0"), Unload("a", "d0")):
            with pytest.raises(InvalidAction, match="in-flight"):
                apply(view, action)
        full = cluster(view.devices, [*view.models, mdl("c", ("d1",), size=70)])
        with pytest.raises(InvalidAction, match="over-commit"):
            apply(full, Migrate("a", "d0", "d1"))
        moved = apply(view, Migrate("a", "d0", "d1"))
        assert moved.model("a").placements == (Placement("d1", ACTIVE, 2),)  # carries requests
        woke = apply(view, Wake("b", "d1"))
        assert state(woke, "b", "d1") == ACTIVE and woke.free_bytes("d1") == 60
        out = apply(view, ScaleOut("a", "d1"))
        assert out.model("a").on(ACTIVE) == ("d0", "d1")
        assert apply(out, ScaleIn("a", "d0")).model("a").on(ACTIVE) == ("d1",)
        with pytest.raises(InvalidAction, match="duplicate"):
            apply(out, ScaleOut("a", "d1"))
        assert apply(view, Unload("b", "d1")).model("b").placements == ()
        # Migrating onto a parked copy of the same model wakes it.
        view2 = cluster(view.devices, [mdl("a", ("d0",), ("d1", PARKED))])
        woken = apply(view2, Migrate("a", "d0", "d1"))
        assert woken.model("a").placements == (Placement("d1", ACTIVE),)

    def test_apply_does_not_touch_its_input(self):
        view = cluster([dev("d0")], [mdl("a")], a=wants())
        apply(view, Load("a", "d0"))
        assert view.model("a").placements == ()
        assert apply(view, RequestCapacity(10, for_model="a")) is view


# --- demand estimator --------------------------------------------------------------

class TestDemandEstimator:
    def test_steady_stream_converges_to_its_rate(self):
        est = DemandEstimator(half_life_s=10)
        for i in range(2000):  # 4 req/s for 500 s
            est.observe("a", i * 0.25)
        assert est.rate("a", 500) == pytest.approx(4, rel=0.05)
        assert est.last_used("a") == 499.75

    def test_half_life_and_unknown(self):
        est = DemandEstimator(half_life_s=10)
        est.observe("a", 0, n=10)
        r0 = est.rate("a", 0)
        assert r0 == pytest.approx(10 * math.log(2) / 10)
        assert est.rate("a", 10) == pytest.approx(r0 / 2)
        assert est.rate("b", 10) == 0.0 and est.last_used("b") == float("-inf")
        d = est.demand("a", 20, queue=3)
        assert d.queue == 3 and d.rate == pytest.approx(r0 / 4) and d.last_used == 0

    def test_late_report_and_determinism(self):
        a, b = DemandEstimator(5), DemandEstimator(5)
        for est in (a, b):
            est.observe("m", 10)
            est.observe("m", 4, n=2)  # late: decayed to t=10, time does not go back
        assert a.rate("m", 12) == b.rate("m", 12)
        assert a.last_used("m") == 10
        assert a.rate("m", 10) == pytest.approx((1 + 2 * 0.5 ** (6 / 5)) * math.log(2) / 5)
        with pytest.raises(ValueError):
            DemandEstimator(0)


# --- default policy: cold models -----------------------------------------------------

def test_cold_model_with_demand_loads_on_cheapest_best_fit_device():
    view = cluster([dev("big", mem=200, cost=1), dev("pricey", mem=50, cost=3),
                    dev("small", mem=50, cost=1)], [mdl("a")], a=wants(queue=1))
    assert decide(view) == [Load("a", "small")]


def test_cold_model_shares_an_idle_family_engine_rather_than_start_one():
    """Room on both devices, but b's engine sits idle: a joins it (a swap in
    place costs milliseconds, a new engine tens of seconds and memory)."""
    view = cluster([dev("d0"), dev("d1")],
                   [mdl("a"), mdl("b", ("d0",)), mdl("q", ("d1",), family="qwen")],
                   a=wants(queue=1), b=wants(), q=wants())
    assert decide(view) == [Load("a", "d0", park=True), Swap("a", "d0", "b")]


def test_cold_model_prefers_a_device_hosting_its_family():
    """b is busy, so a needs an engine of its own: next to its family."""
    view = cluster([dev("d0"), dev("d1")],
                   [mdl("a"), mdl("b", ("d0", ACTIVE, 1)), mdl("q", ("d1",), family="qwen")],
                   a=wants(queue=1), b=wants(inflight=1), q=wants())
    assert decide(view) == [Load("a", "d0")]


def test_no_demand_no_action():
    view = cluster([dev("d0")], [mdl("a"), mdl("b", ("d0", PARKED))],
                   a=wants(rate=0), b=wants(rate=0))
    assert decide(view) == []


def test_three_cold_same_family_models_share_one_engine():
    """One engine slot; each model in turn gets a request: they end up on one
    device, one active and two parked, by load-parked + swap in place."""
    view = cluster([dev("d0", mem=50), dev("other", vendor="amd", acc="MI300")],
                   [mdl(n, allowed_vendors=("nvidia",)) for n in "abc"],
                   a=wants(queue=1))
    view = apply_all(view, decide(view))
    assert state(view, "a", "d0") == ACTIVE
    for name, prev in (("b", "a"), ("c", "b")):
        demand = {m: wants(queue=int(m == name)) for m in "abc"}
        view = cluster(view.devices, view.models, **demand)
        actions = decide(view)
        assert actions == [Load(name, "d0", park=True), Swap(name, "d0", prev)]
        view = apply_all(view, actions)
    assert [m.name for m in view.residents("d0", ACTIVE)] == ["c"]
    assert sorted(m.name for m in view.residents("d0", PARKED)) == ["a", "b"]
    # The next request for a parked one is a plain swap: no load at all.
    view = cluster(view.devices, view.models, a=wants(queue=1), b=wants(), c=wants())
    assert decide(view) == [Swap("a", "d0", "c")]


def test_swap_only_when_the_active_model_is_idle():
    models = lambda inflight: [mdl("a", ("d0", ACTIVE, inflight)), mdl("b", ("d0", PARKED))]
    idle = cluster([dev("d0", mem=50)], models(0), a=wants(), b=wants(queue=1))
    # a keeps its rate but is now one swap away, parked by b's engine: content.
    assert decide(idle) == [Swap("b", "d0", "a")]
    assert decide(apply_all(idle, decide(idle))) == []
    busy = cluster([dev("d0", mem=50)], models(2), a=wants(inflight=2), b=wants(queue=1))
    assert decide(busy) == [RequestCapacity(40, for_model="b")]
    queued = cluster([dev("d0", mem=50)], models(0), a=wants(queue=1), b=wants(rate=0.2, queue=1))
    assert decide(queued) == [RequestCapacity(40, for_model="b")]


def test_waiting_requests_swap_out_an_idle_cold_family_member_even_if_more_wanted():
    models = [mdl("a", ("d0",)), mdl("b", ("d0", PARKED))]
    view = cluster([dev("d0", mem=50)], models, a=wants(0.4), b=wants(0.1, queue=1))
    assert decide(view) == [Swap("b", "d0", "a")]  # time-sharing: a swap costs ms
    # ... but not a hot one, and not on a mere rate with nothing waiting.
    hot = cluster([dev("d0", mem=50)], models, a=wants(1.5), b=wants(0.1, queue=1))
    assert decide(hot) == [RequestCapacity(40, for_model="b")]
    idle = cluster([dev("d0", mem=50), dev("d1", mem=50)], [mdl("a", ("d0",)), mdl("b")],
                   a=wants(0.4), b=wants(0.1))
    assert decide(idle) == [Load("b", "d1")]  # free room is fine
    full = cluster([dev("d0", mem=50)], [mdl("a", ("d0",)), mdl("b")], a=wants(0.4), b=wants(0.1))
    assert decide(full) == []


def test_evicts_the_least_wanted_model():
    view = cluster([dev("d0", mem=80), dev("d1", mem=80)],
                   [mdl("x", ("d0",), family="x"), mdl("y", ("d0",), family="y"),
                    mdl("w", ("d1",), family="w"), mdl("v", ("d1",), family="v"),
                    mdl("z", family="z")],
                   x=wants(0.05), y=wants(0.2), w=wants(0.3), v=wants(0.3),
                   z=wants(0.3, queue=2))
    # x still has demand, so it is parked (kept in host memory), not unloaded.
    assert decide(view)[:2] == [Park("x", "d0"), Load("z", "d0")]


def test_evicts_a_model_without_demand_by_unloading_it():
    view = cluster([dev("d0", mem=50)], [mdl("x", ("d0",), family="x"), mdl("z", family="z")],
                   x=wants(rate=0, last_used=NOW - 10), z=wants(queue=1))
    assert decide(view) == [Unload("x", "d0"), Load("z", "d0")]


def test_waiting_requests_evict_an_idle_cold_model_even_if_more_wanted():
    """Requests waiting beat history: an idle cold model gives way (parked,
    since it has demand); without waiting requests it would not."""
    models = [mdl("x", ("d0",), family="x"), mdl("z", family="z")]
    view = cluster([dev("d0", mem=50)], models, x=wants(0.4), z=wants(0.3, queue=1))
    assert decide(view) == [Park("x", "d0"), Load("z", "d0")]
    assert decide(cluster([dev("d0", mem=50)], models, x=wants(0.4), z=wants(0.3))) == []


@pytest.mark.parametrize("x_kw, x_demand", [
    ({"pinned": True}, wants(rate=0)),  # pinned: never
    ({}, wants(rate=1.5)),  # hot, and more wanted than the requester
    ({}, wants(rate=0.01, queue=1)),  # requests queued for it: not idle
    ({}, wants(rate=0.01, inflight=1)),  # busy
    ({"min_replicas": 1}, wants(rate=0)),  # at its minimum
])
def test_does_not_evict(x_kw, x_demand):
    inflight = x_demand.inflight
    view = cluster([dev("d0", mem=50)],
                   [mdl("x", ("d0", ACTIVE, inflight), family="x", **x_kw), mdl("z", family="z")],
                   x=x_demand, z=wants(0.3, queue=1))
    assert decide(view) == [RequestCapacity(40, for_model="z")]


def test_equally_wanted_models_do_not_displace_each_other():
    view = cluster([dev("d0", mem=50)], [mdl("x", ("d0",), family="x"), mdl("z", family="z")],
                   x=wants(0.3), z=wants(0.3))
    assert decide(view) == []
    view = cluster(view.devices, view.models, x=wants(0.3), z=wants(0.31))
    assert decide(view) == [Park("x", "d0"), Load("z", "d0")]


def test_a_recent_rate_alone_does_not_ask_for_hardware():
    view = cluster([dev("d0", mem=50)], [mdl("x", ("d0",), family="x", pinned=True),
                                         mdl("z", family="z")], x=wants(), z=wants(0.3))
    assert decide(view) == []


def test_min_replicas_are_kept_without_demand():
    view = cluster([dev("cheap", cost=1), dev("pricey", cost=2)],
                   [mdl("a", min_replicas=2, max_replicas=1)], a=wants(rate=0, last_used=-1e9))
    assert decide(view) == [Load("a", "cheap"), ScaleOut("a", "pricey")]


def test_idle_models_scale_to_zero():
    view = cluster([dev("d0"), dev("d1")],
                   [mdl("a", ("d0",), ("d1", PARKED)),
                    mdl("b", ("d0",), ("d1", PARKED), min_replicas=1),
                    mdl("c", ("d1",), pinned=True), mdl("d", ("d0", ACTIVE, 1))],
                   a=wants(rate=0.001, last_used=NOW - 601), b=wants(rate=0, last_used=NOW - 601),
                   c=wants(rate=0, last_used=NOW - 601), d=wants(rate=0, last_used=0, inflight=1))
    actions = decide(view)
    assert set(actions) == {Unload("a", "d0"), Unload("a", "d1"), Unload("b", "d1")}
    assert decide(view, now=NOW - 10) == []  # not idle yet: leave them


# --- default policy: hot models ---------------------------------------------------------

FLEET = [dev("slow", speed=1, cost=1), dev("fast", speed=4, cost=3), dev("fast2", speed=4, cost=3)]


def test_hot_model_gets_fast_devices_and_enough_replicas():
    hot = mdl("h", max_replicas=3)
    assert decide(cluster(FLEET, [hot], h=wants(3))) == [Load("h", "fast")]  # 8 req/s > 3
    assert decide(cluster(FLEET, [hot], h=wants(10))) == [Load("h", "fast"), ScaleOut("h", "fast2")]
    assert decide(cluster(FLEET, [hot], h=wants(20))) == [
        Load("h", "fast"), ScaleOut("h", "fast2"), ScaleOut("h", "slow")]  # capped at max 3
    capped = mdl("h", max_replicas=1)
    assert decide(cluster(FLEET, [capped], h=wants(20))) == [Load("h", "fast")]


def test_replica_count_follows_the_formula_on_equal_devices():
    fleet = [dev(f"d{i}") for i in range(5)]
    policy = DefaultPolicy(replica_rps_by_model={"h": 1.5})
    view = cluster(fleet, [mdl("h", max_replicas=5)], h=wants(4.0))  # ceil(4 / 1.5) = 3
    view = apply_all(view, decide(view, policy))
    assert len(view.model("h").on(ACTIVE)) == 3


def test_hot_model_prefers_an_empty_device():
    view = cluster([dev("d0"), dev("d1")], [mdl("c", ("d0",)), mdl("h", max_replicas=1)],
                   c=wants(), h=wants(1.5, queue=1))
    assert decide(view) == [Load("h", "d1")]


def test_scale_in_with_hysteresis():
    two = mdl("h", ("fast",), ("fast2",), max_replicas=3)
    assert decide(cluster(FLEET, [two], h=wants(5))) == []  # one replica: 8 req/s at 62%
    assert decide(cluster(FLEET, [two], h=wants(3))) == [ScaleIn("h", "fast")]  # 37%


def test_hot_stays_hot_while_alone_above_cold_rate():
    alone = cluster([dev("d0"), dev("d1")], [mdl("h", ("d0",)), mdl("c", ("d1",))])
    shared = cluster([dev("d0")], [mdl("h", ("d0",)), mdl("c", ("d0",))])
    heat = lambda view, rate: Heat.of(cluster(view.devices, view.models, h=wants(rate)),
                                      NOW, 1.0, 0.5, 600).hot
    assert "h" in heat(alone, 0.7) and "h" in heat(shared, 1.0)
    assert "h" not in heat(shared, 0.7) and "h" not in heat(alone, 0.4)


# --- default policy: heterogeneity and constraints ---------------------------------------

def test_vendor_and_accelerator_constraints_are_respected():
    fleet = [dev("nv", cost=0.1), dev("amd", vendor="amd", acc="MI300", cost=5)]
    view = cluster(fleet, [mdl("a", allowed_vendors=("amd",))], a=wants(queue=1))
    assert decide(view) == [Load("a", "amd")]
    full = cluster(fleet, [mdl("a", allowed_vendors=("amd",)),
                           mdl("x", ("amd",), size=80, pinned=True)], a=wants(queue=1), x=wants())
    assert decide(full) == [RequestCapacity(40, ("amd",), for_model="a")]
    acc = cluster(fleet, [mdl("b", allowed_accelerators=("MI300",))], b=wants(queue=1))
    assert decide(acc) == [Load("b", "amd")]


def test_big_models_prefer_fast_and_small_cold_ones_cheap_devices():
    fleet = [dev("cheap", mem=200, speed=1, cost=1), dev("fast", mem=200, speed=4, cost=4)]
    policy = DefaultPolicy(big_model_bytes=100)
    view = cluster(fleet, [mdl("big", size=150), mdl("small")],
                   big=wants(queue=1), small=wants(queue=1))
    assert decide(view, policy) == [Load("big", "fast"), Load("small", "cheap")]


# --- default policy: consolidation ------------------------------------------------------

def test_consolidation_empties_the_pricier_device_once():
    view = cluster([dev("d0", cost=2), dev("d1", cost=1)],
                   [mdl("a", ("d0",)), mdl("b", ("d1",))], a=wants(), b=wants())
    actions = decide(view)
    assert actions == [Migrate("a", "d0", "d1")]
    assert decide(apply_all(view, actions)) == []


def test_consolidation_never_moves_pinned_or_when_it_cannot_empty():
    pinned = cluster([dev("d0", cost=2), dev("d1", cost=1)],
                     [mdl("a", ("d0",), pinned=True), mdl("b", ("d1",))], a=wants(), b=wants())
    assert decide(pinned) == [Migrate("b", "d1", "d0")]  # the other way round is fine
    crowded = cluster([dev("d0", cost=2), dev("d1", cost=1)],
                      [mdl("a", ("d0",), size=60), mdl("b", ("d1",), size=60)],
                      a=wants(), b=wants())
    assert decide(crowded) == []


def test_hot_model_sharing_a_device_moves_to_an_empty_one():
    view = cluster([dev("d0"), dev("d1")],
                   [mdl("h", ("d0",)), mdl("c", ("d0",))], h=wants(1.5), c=wants())
    actions = decide(view)
    assert actions == [Migrate("h", "d0", "d1")]
    assert decide(apply_all(view, actions)) == []  # and cold c is not moved back onto h


# --- baselines ------------------------------------------------------------------------------

def test_dedicated_gives_each_model_its_own_device_and_never_unloads():
    fleet = [dev("d0"), dev("d1", mem=50)]
    view = cluster(fleet, [mdl("a"), mdl("b"), mdl("c")],
                   a=wants(queue=1), b=wants(0.5), c=wants(0.01))
    assert decide(view, DedicatedPolicy()) == [
        Load("b", "d1"), Load("a", "d0"), RequestCapacity(40, for_model="c")]
    idle = cluster(fleet, [mdl("a", ("d0",))], a=wants(rate=0, last_used=-1e9))
    assert decide(idle, DedicatedPolicy()) == []


def test_lru_loads_on_request_and_evicts_least_recently_used_idle():
    lru = LRUScaleToZeroPolicy(keep_alive_s=300)
    view = cluster([dev("d0")], [mdl("a"), mdl("b", ("d0", PARKED))], a=wants(queue=1), b=wants())
    assert decide(view, lru) == [Load("a", "d0")]  # an engine of its own, no swap
    # LRU ignores rates: "old" goes although it is wanted more than "new".
    full = cluster([dev("d0")], [mdl("old", ("d0",)), mdl("new", ("d0",)), mdl("z")],
                   old=wants(0.9, last_used=NOW - 100), new=wants(0.1, last_used=NOW - 5),
                   z=wants(queue=1))
    assert decide(full, lru) == [Unload("old", "d0"), Load("z", "d0")]
    busy = cluster([dev("d0", mem=50)], [mdl("old", ("d0", ACTIVE, 1)), mdl("z")],
                   old=wants(last_used=NOW - 100, inflight=1), z=wants(queue=1))
    assert decide(busy, lru) == [RequestCapacity(40, for_model="z")]


def test_lru_unloads_after_keep_alive():
    lru = LRUScaleToZeroPolicy(keep_alive_s=60)
    view = cluster([dev("d0")], [mdl("a", ("d0",)), mdl("b", ("d0",))],
                   a=wants(last_used=NOW - 61), b=wants(last_used=NOW - 59))
    assert decide(view, lru) == [Unload("a", "d0")]


# --- registry and config --------------------------------------------------------------------

def test_make_policy():
    assert make_policy("default", hot_rate=2.0).config.hot_rate == 2.0
    assert make_policy("lru", keep_alive_s=5).keep_alive_s == 5
    assert make_policy("dedicated").name == "dedicated"
    with pytest.raises(ValueError, match="unknown policy 'nope'; known: dedicated, default, lru"):
        make_policy("nope")
    with pytest.raises(ValueError, match="bad config for policy 'default'"):
        make_policy("default", hot_rat=2.0)


def test_config_validation():
    with pytest.raises(ValueError, match="cold_rate"):
        DefaultConfig(hot_rate=1, cold_rate=2)
    with pytest.raises(ValueError, match="positive"):
        DefaultConfig(replica_rps_by_model={"a": 0})
    with pytest.raises(ValueError, match="scale_in_util"):
        DefaultConfig(scale_in_util=1.0)


def test_policies_import_no_ray_vllm_or_cluster():
    import subprocess
    import sys

    code = ("import sys, policies; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm', 'cluster')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- time-shared devices -------------------------------------------------------

def _ts_view(tpot_s):
    b = ModelView(name="b", family="llama", weights_bytes=40, kv_cache_bytes=0, tpot_slo_s=0.1,
                  placements=(Placement("d0", PARKED, 1, timeshared=True, tpot_s=tpot_s),))
    a = mdl("a", ("d0", ACTIVE, 1))
    a = ModelView(**{**a.__dict__, "placements": (Placement("d0", ACTIVE, 1, timeshared=True),)})
    return cluster([dev("d0"), dev("d1")], [a, b], a=wants(queue=1), b=wants(queue=1))


def test_a_time_shared_model_within_its_slo_needs_no_copy_of_its_own():
    """Requests wait for b, parked on d0; but d0 time-shares it: no swap, no load."""
    assert decide(_ts_view(tpot_s=0.05)) == []
    assert decide(_ts_view(tpot_s=None)) == []  # not measured yet: trusted


def test_an_overloaded_time_shared_model_gets_a_copy_elsewhere():
    """b's measured TPOT is over its SLO on d0: the device is overloaded, so
    b gets an engine on the free device (never a swap on d0, whose turns
    are its scheduler's)."""
    actions = decide(_ts_view(tpot_s=0.3))
    assert [(type(x), x.model, x.device) for x in actions] == [(Load, "b", "d1")]
