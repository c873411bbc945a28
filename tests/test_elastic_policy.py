"""The elastic layer on hand-built views with an injected clock: which kind
a want gets, the one standing request (totals, hysteresis), giving devices
back and taking them back, and the minimum node lifetime. No Ray.

Memory is in abstract units, as in test_policy_unit.py.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from policies import (ACTIVE, PARKED, ClusterView, DefaultPolicy, Demand, DeviceView, Load,
                      ModelView, Placement, RequestCapacity, ScaleIn, Unload, apply_all)
from policies.actions import ReclaimDevice, ReleaseDevice, SetCapacity
from policies.capacity import NodeKind, pack, settle, why_unplaceable
from policies.elastic import ElasticConfig, ElasticPolicy, ElasticState, ElasticView

T0 = 10_000.0
# Two addable kinds: a fast, dear one and a slow, cheap one (the AMD one is
# the only kind an "amd"-only model may use).
H100 = NodeKind("H100", "nvidia", 100, speed=4.0, cost_per_hour=4.0, max_devices=3)
L4 = NodeKind("L4", "nvidia", 100, speed=1.0, cost_per_hour=1.0, max_devices=3)
MI300 = NodeKind("MI300", "amd", 200, speed=5.0, cost_per_hour=3.0, max_devices=1)
KINDS = (H100, L4, MI300)
CFG = ElasticConfig(shrink_delay_s=30, release_idle_s=60, min_node_lifetime_s=300)


def dev(id, acc="L4", vendor="nvidia", mem=100, speed=1.0):
    return DeviceView(id, f"node-{id}", vendor, acc, mem, speed)


def mdl(name, *placements, size=40, **kw):
    ps = tuple(Placement(p[0], p[1] if len(p) > 1 else ACTIVE, p[2] if len(p) > 2 else 0)
               for p in placements)
    return ModelView(name=name, family=kw.pop("family", name), weights_bytes=size,
                     kv_cache_bytes=0, placements=ps, **kw)


def want(model, mem=40, fast=False, vendors=(), accelerators=()):
    return RequestCapacity(mem, vendors, accelerators, model, fast)


def policy(config=CFG, **placement):
    placement.setdefault("idle_unload_s", 100)
    return ElasticPolicy(DefaultPolicy(**placement), KINDS, config)


def decide(view, state, now, spare=(), p=None):
    p = p or policy()
    ev = ElasticView(view, tuple(spare))
    actions, nxt = p.decide(ev, state, now)
    again, nxt2 = p.decide(ev, state, now)
    assert again == actions and nxt2 == nxt  # deterministic, no hidden state
    apply_all(view, actions)  # every action valid, in order
    return actions, nxt


def standing(actions):
    sets = [a for a in actions if isinstance(a, SetCapacity)]
    return sets[0].devices if sets else None


# --- which kind, how many ------------------------------------------------------------

def test_cold_wants_get_the_cheapest_kind_and_share_a_new_device():
    p = pack([want("a"), want("b"), want("c")], KINDS, (), {})
    # 40 + 40 fit one cheap device of 100, the third opens another.
    assert p.new == {"L4": 2} and not p.unmet and p.reclaim == ()


def test_fast_wants_get_the_fastest_kind_and_a_device_each():
    p = pack([want("h", fast=True), want("i", fast=True, mem=10)], KINDS, (), {})
    assert p.new == {"MI300": 1, "H100": 1}  # MI300 (speed 5) is full after one


def test_constraints_and_max_devices():
    p = pack([want("a", accelerators=("H100",)), want("b", vendors=("amd",), mem=150),
              want("c", vendors=("huawei",)), want("d", mem=500)], KINDS, (), {"H100": 3})
    assert p.new == {"MI300": 1}
    assert "max_devices" in p.unmet["a"]  # 3 H100 in service already
    assert "no addable kind allows it" in p.unmet["c"] and "huawei" in p.unmet["c"]
    assert "500 bytes" in p.unmet["d"]


def test_a_spare_device_is_taken_back_before_a_new_one_is_asked_for():
    spare = (dev("s1", "L4"),)
    p = pack([want("a"), want("b")], KINDS, spare, {"L4": 1})
    assert p.reclaim == ("s1",) and p.new == {}  # both fit the one taken back


def test_settle_grows_at_once_and_shrinks_after_the_delay():
    counts, since = settle({"L4": 3}, {"L4": 1}, {}, T0, 30)
    assert counts == {"L4": 3} and since == {}
    counts, since = settle({"L4": 1}, {"L4": 3}, {}, T0, 30)
    assert counts == {"L4": 3} and since == {"L4": T0}
    counts, since = settle({"L4": 2}, {"L4": 3}, since, T0 + 29, 30)
    assert counts == {"L4": 3} and since == {"L4": T0}  # the first lower time stays
    counts, since = settle({}, {"L4": 3}, since, T0 + 30, 30)
    assert counts == {} and since == {}


def test_why_unplaceable_names_the_constraint_and_what_is_there():
    amd_only = mdl("x", allowed_vendors=("amd",), size=300)
    why = why_unplaceable(amd_only, [dev("d0")], KINDS)
    assert "allows vendors ['amd']" in why and "300 bytes" in why
    assert "nvidia/L4" in why and "MI300" in why
    assert why_unplaceable(mdl("y", allowed_vendors=("amd",)), [dev("d0")], KINDS) is None
    assert why_unplaceable(mdl("z"), [dev("d0")], ()) is None  # fits a device here


# --- the standing request --------------------------------------------------------------

def test_the_first_round_always_sends_the_request_even_an_empty_one():
    actions, st = decide(ClusterView((), ()), ElasticState(), T0)
    assert standing(actions) == () and st.standing == ()
    again, _ = decide(ClusterView((), ()), st, T0 + 1)
    assert standing(again) is None  # unchanged: not re-sent


def test_a_model_allowed_only_on_an_absent_kind_asks_for_one_counting_what_is_there():
    view = ClusterView((dev("h1", "H100"),),
                       (mdl("busy", ("h1",), size=100, pinned=True),
                        mdl("x", allowed_accelerators=("H100",))),
                       {"busy": Demand(1.0, inflight=1), "x": Demand(queue=1)})
    actions, st = decide(view, ElasticState(), T0)
    # Totals, as Ray reads them: the H100 in service (pinned to its node)
    # plus one new one on any node.
    assert standing(actions) == (("H100", None, 1), ("H100", "node-h1", 1))
    assert [w.for_model for w in st.wants] == ["x"] and st.unmet == {}
    # While the node boots the want stays and so does the request: nothing re-sent.
    assert standing(decide(view, st, T0 + 5)[0]) is None
    # The node joins: the model loads there; kept 2 + new 0 is the same
    # total, now pinned to the two nodes: nothing more to add.
    joined = replace(view, devices=view.devices + (dev("h2", "H100"),))
    actions, st = decide(joined, st, T0 + 10)
    assert Load("x", "h2") in actions
    assert standing(actions) == (("H100", "node-h1", 1), ("H100", "node-h2", 1))


def test_an_unmet_want_is_reported_not_requested():
    view = ClusterView((), (mdl("x", allowed_vendors=("huawei",)),), {"x": Demand(queue=2)})
    actions, st = decide(view, ElasticState(), T0)
    assert standing(actions) == () and "no addable kind" in st.unmet["x"]


# --- scale-down: release, hysteresis, node lifetime --------------------------------------

def test_an_idle_device_is_given_back_after_release_idle_s_and_min_lifetime():
    view = ClusterView((dev("base", acc=None, vendor="cpu"), dev("l1", "L4")),
                       (mdl("p", ("l1", PARKED)),))
    st = ElasticState(standing=(("L4", 1),), request=(("L4", "node-l1", 1),),
                      first_seen={"l1": T0 - 1000, "base": T0 - 1000})
    actions, st = decide(view, st, T0)
    assert not any(isinstance(a, ReleaseDevice) for a in actions)  # empty since now
    assert st.empty_since == {"l1": T0}
    actions, st = decide(view, st, T0 + 60)
    # Its parked copy goes first; the CPU device (not addable) is never released.
    assert actions[:2] == [Unload("p", "l1"), ReleaseDevice("l1")]
    assert st.released == {"l1"}
    # Unpinned at once, but the count shrinks only after shrink_delay_s.
    assert standing(actions) == (("L4", None, 1),)
    gone = ClusterView((view.devices[0],), (mdl("p"),))
    spare = (view.devices[1],)  # released, node still up
    assert standing(decide(gone, st, T0 + 80, spare)[0]) is None
    actions, st = decide(gone, st, T0 + 91, spare)
    assert standing(actions) == ()  # now Ray may remove the node
    _, st = decide(gone, st, T0 + 100)  # the node is gone: forgotten
    assert st.released == frozenset()


def test_no_release_of_a_young_device_a_busy_one_or_one_holding_a_pinned_copy():
    young = ClusterView((dev("l1", "L4"),), ())
    st = ElasticState(first_seen={"l1": T0}, empty_since={"l1": T0 - 1000})
    assert not any(isinstance(a, ReleaseDevice) for a in decide(young, st, T0 + 299)[0])
    assert any(isinstance(a, ReleaseDevice) for a in decide(young, st, T0 + 300)[0])
    old = replace(st, first_seen={"l1": T0 - 1000})
    pinned = ClusterView((dev("l1", "L4"),), (mdl("p", ("l1", PARKED), pinned=True),))
    assert not any(isinstance(a, ReleaseDevice) for a in decide(pinned, old, T0)[0])


def test_a_replica_on_a_young_node_is_not_scaled_in_until_its_lifetime_passes():
    # l2, the slower, is the replica to drop; it joined at T0.
    view = ClusterView((dev("l1", "L4", speed=2.0), dev("l2", "L4")),
                       (mdl("h", ("l1",), ("l2",)),), {"h": Demand(rate=0.1, last_used=T0)})
    st = ElasticState(first_seen={"l1": T0 - 1000, "l2": T0})
    p = policy(replica_rps=2.0)
    actions, _ = decide(view, st, T0 + 99, p=p)
    assert not any(isinstance(a, (ScaleIn, Unload)) for a in actions)
    no_lifetime = policy(replace(CFG, min_node_lifetime_s=0), replica_rps=2.0)
    assert ScaleIn("h", "l2") in decide(view, st, T0 + 99, p=no_lifetime)[0]  # it was vetoed
    p = policy(replica_rps=2.0, idle_unload_s=1000)
    assert ScaleIn("h", "l2") in decide(view, st, T0 + 300, p=p)[0]


def test_a_released_device_is_taken_back_when_wanted_again():
    spare = (dev("l1", "L4"),)
    view = ClusterView((), (mdl("x"),), {"x": Demand(queue=1)})
    st = ElasticState(request=(), released=frozenset({"l1"}))
    actions, st = decide(view, st, T0, spare)
    assert ReclaimDevice("l1") in actions and standing(actions) == (("L4", "node-l1", 1),)
    assert st.released == frozenset()


def test_without_an_autoscaler_nothing_is_released():
    view = ClusterView((dev("l1", "L4"),), ())
    st = ElasticState(first_seen={"l1": 0.0}, empty_since={"l1": 0.0})
    actions, _ = decide(view, st, T0, p=policy(replace(CFG, release=False)))
    assert not any(isinstance(a, ReleaseDevice) for a in actions)


# --- property: never ask for less than is in service --------------------------------------

@given(st.lists(st.tuples(st.sampled_from(["H100", "L4", "MI300", None]),
                          st.integers(0, 2)), min_size=0, max_size=5),
       st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.integers(10, 120)), max_size=6),
       st.integers(0, 400))
def test_the_request_never_counts_fewer_devices_than_are_in_service(devs, queued, dt):
    vendor = {"H100": "nvidia", "L4": "nvidia", "MI300": "amd", None: "cpu"}
    devices = tuple(DeviceView(f"d{i}", f"n{i}", vendor[acc], acc, 100 if acc != "MI300" else 200)
                    for i, (acc, _) in enumerate(devs))
    models = [mdl(f"m{i}", size=size) for i, (_, _, size) in enumerate(queued)]
    demand = {f"m{i}": Demand(rate=2.0 if hot else 0.1, queue=q)
              for i, (q, hot, _) in enumerate(queued)}
    view = ClusterView(devices, tuple(models), demand)
    st_ = ElasticState(first_seen={d.id: T0 - 500 for d in devices},
                       empty_since={d.id: T0 - 500 for d in devices})
    actions, nxt = decide(view, st_, T0 + dt)
    after = apply_all(view, actions)
    in_service = {}
    for d in after.devices:
        if d.accelerator_type in {k.name for k in KINDS}:
            in_service[d.accelerator_type] = in_service.get(d.accelerator_type, 0) + 1
    asked = dict(nxt.standing)
    assert all(asked.get(k, 0) >= n for k, n in in_service.items()), (asked, in_service)
    assert all(n <= next(x for x in KINDS if x.name == k).max_devices or n == in_service.get(k)
               for k, n in asked.items())
    # ... and every device in service is pinned to its node in the request.
    pinned = {(k, node): n for k, node, n in nxt.request if node is not None}
    assert pinned == {(d.accelerator_type, d.node): 1 for d in after.devices
                      if d.accelerator_type in {k.name for k in KINDS}}
