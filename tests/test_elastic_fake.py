"""Elastic capacity through the real controller, actuator and router, with
FAKE in-memory workers and a FAKE autoscaler (``FakeFleet.autoscale``,
driven by the test): the standing request that reaches "Ray", a node that
joins and serves, scale-down with a stream in flight, a released device
taken back, and a model that can never run failing at once. No Ray, no
vLLM; the same story on Ray's fake multi-node autoscaler is
``tests/test_elastic_ray.py``."""

from __future__ import annotations

import asyncio

import pytest

from cluster.engine.device import DeviceSpec
from cluster.errors import NoCapacityError
from cluster.testing.fake_fleet import FakeFleet, fake_token
from tests.test_control_fake import run as run_fake

MiB = 2**20
FOOTPRINT = 100 * MiB
PROMPT = "hello"
GREEDY = {"max_tokens": 12}
LABEL = "shoal.io/accelerator-type"


def catalog(**capacity) -> dict:
    def model(name, **kw):
        return {"name": name, "path": f"/fake/{name}", "family": "llama",
                "weights_bytes": 60 * MiB, "kv_cache_bytes": 40 * MiB, **kw}
    return {
        "models": [model("any", max_replicas=2), model("only-x", allowed_accelerators=["X"]),
                   model("only-ascend", allowed_vendors=["huawei"])],
        "discovery": {"accelerators": {
            "X": {"memory_bytes": 2 * FOOTPRINT, "speed": 1.0, "cost_per_hour": 3.0}}},
        "capacity": {"accelerators": {"X": {"max_devices": 2}}, "shrink_delay_s": 0,
                     "release_idle_s": 0, "min_node_lifetime_s": 0, **capacity},
        # One replica serves 100 req/s: a second one is always surplus.
        "controller": {"tick_s": 0, "health_check_s": 3600, "load_timeout_s": 5,
                       "policy_config": {"idle_unload_s": 3600, "replica_rps": 100.0}},
    }


def x_device(kind: str, i: int) -> DeviceSpec:
    """What a new node of the X node type brings: one X device (as fast as
    the base device and dearer, so it is the replica a lull drops)."""
    return DeviceSpec(f"{kind.lower()}{i}", "cpu", 2 * FOOTPRINT, vendor="nvidia",
                      accelerator_type=kind, node_id=f"node-{kind}{i}", speed=1.0,
                      cost_per_hour=3.0)


BASE = DeviceSpec("base", "cpu", 2 * FOOTPRINT, cost_per_hour=1.0)  # not addable
X_BUNDLE = {"GPU": 1, "accelerator_type:X": 0.001}
ON_X0 = {LABEL: "X", "ray.io/node-id": "node-X0"}  # pinned: the node in service


def run(scenario, cat=None, devices=(BASE,), load_s=0.0):
    return run_fake(scenario, cat or catalog(), FakeFleet(list(devices), load_s=load_s))


def expected(model: str) -> list[int]:
    return [fake_token(model, PROMPT, i) for i in range(GREEDY["max_tokens"])]


async def collect(stream) -> list[int]:
    return [t async for c in stream for t in c["token_ids"]]


async def until(pred, timeout_s: float = 5.0):
    for _ in range(int(timeout_s / 0.005)):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met")


def kinds_of(actions: list[dict]) -> list[str]:
    return [a["action"].split("(")[0] for a in actions]


def test_a_model_allowed_only_on_an_absent_type_gets_a_node_and_is_served_there():
    async def scenario(c, fleet, router):
        served = asyncio.ensure_future(collect(router.stream("only-x", PROMPT, sampling=GREEDY)))
        await until(lambda: fleet.requests and fleet.requests[-1][0])
        # One device of type X, named by resource and by label (autoscaler v2).
        assert fleet.requests[-1] == ([X_BUNDLE], [{LABEL: "X"}])
        assert not served.done()  # waiting for the node, not failed
        assert c.model_status("only-x")["queue"] == 1
        added, _ = fleet.autoscale(x_device)
        assert added == ["x0"]
        await c.tick()  # the controller discovers the node and loads the model there
        assert await served == expected("only-x")
        assert c.model_status("only-x")["devices"] == {"x0": "active"}
        # In service 1 + new 0 is what was asked: now pinned to the node that
        # came, and no second node.
        assert fleet.requests[-1] == ([X_BUNDLE], [ON_X0])
        sent = len(fleet.requests)
        await c.tick()
        assert len(fleet.requests) == sent and fleet.autoscale(x_device) == ([], [])
        assert (await c.status())["capacity"]["standing"] == {"X": 1}
    run(scenario)


def test_a_model_no_device_may_run_and_none_can_be_added_fails_at_once_naming_why():
    async def scenario(c, fleet, router):
        with pytest.raises(NoCapacityError) as e:
            await asyncio.wait_for(collect(router.stream("only-ascend", PROMPT)), 1.0)
        assert e.value.status == 503 and e.value.retry_after_s > 0
        assert "allows vendors ['huawei']" in str(e.value) and "addable: ['X']" in str(e.value)
    run(scenario)


def test_idle_pool_scales_in_a_stream_moves_and_the_node_goes():
    """A surplus replica on the added node is scaled in while a stream runs
    on it: the stream moves to the base copy and completes with no token
    lost or repeated; the empty device is released, the request withdrawn,
    and the fake autoscaler removes the node."""
    async def scenario(c, fleet, router):
        await c.load("any", "x0")
        stream = router.stream("any", PROMPT, sampling=GREEDY)
        head = [await stream.__anext__() for _ in range(2)]
        assert fleet.fake("x0").inflight  # in flight on the added node
        await c.load("any", "base")
        actions = await c.tick()
        assert kinds_of(actions) == ["ScaleIn", "ReleaseDevice", "SetCapacity"], actions
        rest = await collect(stream)
        assert [t for ch in head for t in ch["token_ids"]] + rest == expected("any")
        assert router.hops == 1
        assert "x0" in c.elastic.released and "x0" not in c.workers
        assert fleet.requests[-1] == ([], [])
        assert fleet.autoscale(x_device, node_types=("X",)) == ([], ["x0"])
        await c.tick()
        assert "x0" not in c.devices and c.elastic.released == frozenset()
        assert c.model_status("any")["devices"] == {"base": "active"}
    run(scenario, devices=(BASE, x_device("X", 0)))


def test_a_released_device_still_up_is_taken_back_when_wanted_again():
    async def scenario(c, fleet, router):
        await c.tick()  # x0 is empty: released (every timer is 0 here)
        assert "x0" in c.elastic.released and fleet.handles["x0"].dead
        ids = await collect(router.stream("only-x", PROMPT, sampling=GREEDY))
        assert ids == expected("only-x")
        assert c.model_status("only-x")["devices"] == {"x0": "active"}
        assert any(r["action"].startswith("ReclaimDevice(") for r in c.log)
        assert fleet.requests[-1] == ([X_BUNDLE], [ON_X0])  # no second node asked for
    run(scenario, devices=(BASE, x_device("X", 0)))


def test_a_request_that_fails_to_send_is_sent_again_next_round():
    async def scenario(c, fleet, router):
        fleet.fail_requests = True
        await c.tick()
        assert any("ConnectionError" in r.get("error", "") for r in c.log)
        assert c.elastic.state.request is None  # not sent: next round sends it
        fleet.fail_requests = False
        await c.tick()
        assert fleet.requests == [([X_BUNDLE], [ON_X0])]  # x0 in service counts
    run(scenario, catalog(release_idle_s=3600), devices=(BASE, x_device("X", 0)))


def test_a_cold_start_longer_than_the_idle_timeout_is_not_unloaded_when_ready():
    """A new node and an engine can take longer than idle_unload_s: the
    model must not count as idle from its requests' arrival, or the round
    after it is ready unloads it before they run."""
    cat = catalog()
    cat["controller"]["policy_config"]["idle_unload_s"] = 0.2

    async def scenario(c, fleet, router):
        await c.resolve("any")  # waits out the 0.5 s load; routes now include it
        actions = await c.tick()
        assert not any(a["action"].startswith("Unload(") for a in actions), actions
        assert c.model_status("any")["state"] == "active"
        assert await collect(router.stream("any", PROMPT, sampling=GREEDY)) == expected("any")
    run(scenario, cat, load_s=0.5)


def test_a_worker_on_a_new_node_is_not_killed_while_it_starts():
    """Silence from a worker that has never answered is a start, not a
    hang: it keeps its grace period; a worker that answered and then went
    silent is still killed after UNRESPONSIVE_POLLS polls (test_control_fake)."""
    from cluster.control.controller import UNRESPONSIVE_POLLS
    from cluster.testing.fake_fleet import FakeWorker, LocalHandle

    async def scenario(c, fleet, router):
        c.rpc_timeout_s = 0.02
        slow = FakeWorker(x_device("X", 0), fleet.journal)
        slow.hung = True  # still starting: no stats() answer yet
        handle = fleet.handles["x0"] = LocalHandle(slow)
        fleet.devices["x0"] = x_device("X", 0)
        await c.tick()
        for _ in range(UNRESPONSIVE_POLLS + 1):
            await c.report_failure("x0")
        assert c.workers["x0"] is handle and not handle.dead
        assert not any("WorkerLost" in r["action"] for r in c.log)
        slow.hung = False  # it is up
        await c.tick()
        assert c.stats["x0"].device.id == "x0"
    run(scenario, catalog(release_idle_s=3600))
