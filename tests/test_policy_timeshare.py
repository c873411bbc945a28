"""The default policy on devices that time-share (a family's models take
turns on one engine there): hand-built views, no Ray, no vLLM. These are the
placements the simulator showed going wrong before: a model that could not
join its family's engine, futile evictions of members, members counted as
replicas. Memory is in abstract units (a device of 100, engines of 80)."""

from __future__ import annotations

from policies import (ACTIVE, PARKED, ClusterView, DefaultPolicy, Demand, DeviceView, Load,
                      ModelView, Placement, RequestCapacity, ScaleIn, Unload, apply_all)

NOW = 1000.0


def dev(id, cost=1.0):
    return DeviceView(id=id, node=id, vendor="nvidia", accelerator_type="H100",
                      memory_bytes=100, cost_per_hour=cost)


def member(device, state=ACTIVE, inflight=0, tpot_s=None):
    return Placement(device, state, inflight, timeshared=True, tpot_s=tpot_s)


def mdl(name, *placements, family="qwen"):
    return ModelView(name=name, family=family, weights_bytes=60, kv_cache_bytes=20,
                     placements=tuple(placements))


def wants(rate=0.1, queue=0, inflight=0):
    return Demand(rate=rate, queue=queue, inflight=inflight, last_used=NOW)


def decide(devices, models, demand, policy=None):
    view = ClusterView(tuple(devices), tuple(models), demand)
    policy = policy or DefaultPolicy()
    actions = policy.decide(view, NOW)
    apply_all(view, actions)  # valid in the policy's own model of the world
    return actions


def test_a_waiting_model_joins_its_familys_time_shared_engine_without_memory():
    """d0 is full (one engine of 80) and time-shares: the new qwen model joins
    that engine (a parked Load, which the worker turns into membership)
    instead of asking for capacity or evicting."""
    actions = decide([dev("d0")], [mdl("a", member("d0", inflight=1)), mdl("new")],
                     {"a": wants(inflight=1), "new": wants(queue=1)})
    assert actions == [Load("new", "d0", park=True)]


def test_no_join_where_the_family_differs_or_the_device_is_busy_enough():
    """Only its family's engine; and not past the busy-members cap (7 busy at
    0.1 req/s with the default 30 s busy span count 1 each)."""
    others = [mdl(f"m{i}", member("d0", PARKED)) for i in range(6)]
    full = decide([dev("d0")], [mdl("a", member("d0")), *others, mdl("new")],
                  {"new": wants(queue=1), "a": wants(), **{f"m{i}": wants() for i in range(6)}})
    assert not any(isinstance(a, Load) for a in full)
    assert any(isinstance(a, RequestCapacity) and a.for_model == "new" for a in full)
    llama = decide([dev("d0")], [mdl("a", member("d0")), mdl("new", family="llama")],
                   {"a": wants(inflight=1), "new": wants(queue=1)})
    assert Load("new", "d0", park=True) not in llama


def test_a_rarely_used_member_counts_for_little():
    """Twenty members at one request an hour keep the device open."""
    rare = [mdl(f"r{i}", member("d0", PARKED)) for i in range(20)]
    actions = decide([dev("d0")], [mdl("a", member("d0")), *rare, mdl("new")],
                     {"new": wants(queue=1), "a": wants(),
                      **{f"r{i}": wants(rate=1 / 3600) for i in range(20)}})
    assert actions == [Load("new", "d0", park=True)]


def test_an_idle_time_shared_engine_goes_whole_or_not_at_all():
    """A llama model waits, d0's only room is a qwen engine: it may go only if
    every member is idle and together they are wanted less, and then every
    member leaves (a member parked would stay a member and free nothing)."""
    rare = {"a": wants(rate=0.01), "b": wants(rate=0.01), "new": wants(queue=1)}
    models = [mdl("a", member("d0")), mdl("b", member("d0", PARKED)),
              mdl("new", family="llama")]
    actions = decide([dev("d0")], models, rare)
    assert set(actions[:2]) == {Unload("a", "d0"), Unload("b", "d0")}
    assert actions[2] == Load("new", "d0")
    busy = [mdl("a", member("d0")), mdl("b", member("d0", PARKED, inflight=1)),
            mdl("new", family="llama")]
    assert not any(isinstance(a, Unload)
                   for a in decide([dev("d0")], busy, {**rare, "b": wants(0.01, inflight=1)}))
    wanted = decide([dev("d0")], models, {"a": wants(), "b": wants(), "new": wants(queue=1)})
    assert not any(isinstance(a, Unload) for a in wanted)  # 0.2 req/s together > 0.1
    # Waiting, even a rarer model gets an engine that keeps less than one model busy.
    seldom = decide([dev("d0")], models, {"a": wants(rate=0.005), "b": wants(rate=0.005),
                                          "new": wants(rate=0.001, queue=1)})
    assert Load("new", "d0") in seldom
    quiet = decide([dev("d0")], models, {"a": wants(rate=0.005), "b": wants(rate=0.005),
                                         "new": wants(rate=0.001)})
    assert not any(isinstance(a, Unload) for a in quiet)  # not waiting: less wanted, stays


def test_members_active_on_two_devices_are_not_replicas_to_scale_in():
    """A member is active only during its turn: two engines that each have it
    on turn are not two replicas, and neither is dropped."""
    actions = decide([dev("d0"), dev("d1")],
                     [mdl("a", member("d0"), member("d1"))], {"a": wants(rate=0.05)})
    assert not any(isinstance(a, ScaleIn) for a in actions)
