"""The real controller, actuator and router driven by FAKE in-memory workers
(``cluster/testing/fake_fleet.py``) in plain asyncio: no Ray cluster, no
vLLM, a few milliseconds each. The same scenarios run against real Ray and
vLLM in ``tests/test_controller.py``; these pin down orderings and races
that the slow tests can only hit by luck."""

from __future__ import annotations

import asyncio

import pytest

from cluster.control.controller import UNRESPONSIVE_POLLS, PlacementController
from cluster.control.router import Router
from cluster.engine.device import DeviceSpec
from cluster.testing.fake_fleet import FakeFleet, LocalHandle, fake_token

MiB = 2**20
FOOTPRINT = 100 * MiB  # weights + KV of every fake model
PROMPT = "hello"
GREEDY = {"max_tokens": 12}


def catalog() -> dict:
    models = [{"name": n, "path": f"/fake/{n}", "family": "llama", "weights_bytes": 60 * MiB,
               "kv_cache_bytes": 40 * MiB} for n in ("a", "b", "c")]
    return {"models": models,
            # Ticks and polls are driven by the tests (tick_s 0: events only).
            "controller": {"tick_s": 0, "health_check_s": 3600, "cold_queue_max": 4,
                           "load_timeout_s": 5, "policy_config": {"idle_unload_s": 3600}}}


def devices() -> list[DeviceSpec]:
    return [DeviceSpec("cheap", "cpu", 2 * FOOTPRINT, cost_per_hour=1.0),
            DeviceSpec("dear", "cpu", 2 * FOOTPRINT, speed=2.0, cost_per_hour=3.0)]


def expected(model: str, n: int = GREEDY["max_tokens"]) -> list[int]:
    return [fake_token(model, PROMPT, i) for i in range(n)]


def run(scenario, cat: dict | None = None, fleet: FakeFleet | None = None):
    """Run ``scenario(controller, fleet, router)`` on a fresh controller
    (this module's catalog and devices unless given)."""
    fleet = fleet or FakeFleet(devices())

    async def main():
        c = PlacementController(cat or catalog(), fleet)
        try:
            await c.status()  # ready: devices discovered, first poll done
            return await scenario(c, fleet, Router(LocalHandle(c)))
        finally:
            await c.shutdown_cluster()
    import ray

    # Run after the Ray tests, the suite's cluster is up already: then only
    # a fake test run alone can show that it would have started Ray.
    ray_before = ray.is_initialized()
    # A loop of its own, never installed as the thread's loop: asyncio.run
    # would leave the thread without one, and later tests (and Ray) that
    # call asyncio.get_event_loop() would then fail.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()
        assert ray.is_initialized() == ray_before, "a fake-fleet test started Ray"


async def collect(stream) -> tuple[list[int], list[dict]]:
    chunks = [c async for c in stream]
    return [t for c in chunks for t in c["token_ids"]], chunks


def where(c: PlacementController, model: str) -> dict:
    return c.model_status(model)["devices"]


def test_cold_start_waits_for_the_policy_then_streams():
    async def scenario(c, fleet, router):
        assert c.model_status("a")["state"] == "cold"
        ids, chunks = await collect(router.stream("a", PROMPT, sampling=GREEDY))
        assert ids == expected("a") and chunks[-1]["finished"]
        assert where(c, "a") == {"cheap": "active"}  # cold and small: the cheap device
        assert ("cheap", "load", "a") in fleet.journal
        assert c.model_status("a")["state"] == "active"
    run(scenario)


def test_migration_is_make_before_break_and_moves_the_stream():
    """Target loaded and routed before the source is evacuated and unloaded;
    the stream in flight continues on the target with no token lost or
    repeated, and the answer shows the model where it now is."""
    async def scenario(c, fleet, router):
        await c.load("a", "cheap")
        stream = router.stream("a", PROMPT, sampling=GREEDY)
        head = [await stream.__anext__()]  # mid-flight: the client reads slowly
        routes_at_evacuate: list = []
        hold = fleet.fake("cheap").gates["evacuate"] = asyncio.Event()
        migrated = asyncio.ensure_future(c.migrate("a", "dear"))
        while ("cheap", "evacuate", "a") not in fleet.journal:
            await asyncio.sleep(0.001)
        routes_at_evacuate.append(list(c.routes.get("a", [])))
        hold.set()
        answer = await migrated
        assert answer["devices"] == {"dear": "active"}
        steps = [(d, m) for d, m, arg in fleet.journal if arg == "a" and m != "stats"]
        assert steps.index(("dear", "load")) < steps.index(("cheap", "evacuate")) \
            < steps.index(("cheap", "unload"))
        assert "dear" in routes_at_evacuate[0]  # the target served before the source left
        ids, rest = await collect(stream)
        assert [t for ch in head + rest for t in ch["token_ids"]] == expected("a")
        assert router.hops == 1
    run(scenario)


def test_a_dead_worker_is_replaced_its_models_re_placed_and_streams_resume():
    async def scenario(c, fleet, router):
        await c.load("a", "cheap")
        stream = router.stream("a", PROMPT, sampling=GREEDY)
        head = [await stream.__anext__(), await stream.__anext__()]
        dead = fleet.handles["cheap"]
        fleet.kill(dead)
        ids, rest = await collect(stream)
        assert [t for ch in head + rest for t in ch["token_ids"]] == expected("a")
        assert router.hops == 1
        assert c.model_status("a")["state"] == "active"
        assert any(r["action"] == "WorkerLost(cheap)" for r in c.log)
        assert fleet.handles["cheap"] is not dead  # a fresh worker for the device
        await c.tick()
        assert all(d["alive"] for d in (await c.status())["devices"])
    run(scenario)


def test_requests_resuming_after_a_death_are_never_shed_by_the_cold_queue():
    """More streams than the cold-start queue holds (4) lose their worker at
    once: every one waits for the re-placed copy and finishes. The bound
    sheds new arrivals only; shedding a resume would lose an accepted request."""
    async def scenario(c, fleet, router):
        await c.load("a", "cheap")
        streams = [router.stream("a", PROMPT, sampling=GREEDY) for _ in range(6)]
        heads = [[await s.__anext__()] for s in streams]
        fleet.kill(fleet.handles["cheap"])
        rests = await asyncio.gather(*(collect(s) for s in streams))
        for head, (_, rest) in zip(heads, rests):
            assert [t for ch in head + rest for t in ch["token_ids"]] == expected("a")
        assert router.hops == 6
    run(scenario)


def test_a_restarted_controller_rebuilds_its_state_from_the_workers():
    async def scenario(c, fleet, router):
        await c.load("a", "cheap")
        await c.load("b", "dear")
        before = {m["name"]: m["devices"] for m in (await c.status())["models"]}
        again = PlacementController(catalog(), fleet)  # the same fleet: finds the workers
        try:
            after = {m["name"]: m["devices"] for m in (await again.status())["models"]}
            assert after == before == {"a": {"cheap": "active"}, "b": {"dear": "active"},
                                       "c": {}}
            assert again.version > c.version - 10**9  # versions come from the clock
            assert again.routes == {"a": ["cheap"], "b": ["dear"]}
        finally:
            for t in again._tasks:
                t.cancel()
    run(scenario)


def test_a_slow_stale_stats_reply_never_overwrites_a_newer_one():
    """A poll sent before a load answers after the polls that saw the load:
    its stale stats (no model) must not replace the fresh ones."""
    async def scenario(c, fleet, router):
        fleet.fake("cheap").stall_stats = stall = asyncio.Event()
        old_poll = asyncio.ensure_future(c.report_failure("cheap"))  # a poll, lock-free
        await asyncio.sleep(0.01)
        await c.load("a", "cheap")
        assert where(c, "a") == {"cheap": "active"}
        stall.set()
        await old_poll
        assert where(c, "a") == {"cheap": "active"}
        assert c.routes["a"] == ["cheap"]
    run(scenario)


def test_a_worker_slow_to_answer_is_not_taken_for_dead():
    """The admin-migrate race: the target's stats polls time out while it is
    busy; the controller keeps it (no WorkerLost, no re-placement), and the
    migration's answer shows the model on the target."""
    async def scenario(c, fleet, router):
        c.rpc_timeout_s = 0.05
        await c.load("a", "cheap")
        target = fleet.fake("dear")
        target.stall_stats = stall = asyncio.Event()
        await c.report_failure("dear")  # one poll times out
        assert "dear" in c.workers and not any("WorkerLost" in r["action"] for r in c.log)
        stall.set()
        answer = await c.migrate("a", "dear")
        assert answer["devices"] == {"dear": "active"}
        assert not c.displaced
    run(scenario)


def test_a_worker_that_never_answers_is_killed_and_replaced():
    async def scenario(c, fleet, router):
        c.rpc_timeout_s = 0.02
        await c.load("a", "cheap")
        hung = fleet.handles["cheap"]
        fleet.fake("cheap").hung = True
        for _ in range(UNRESPONSIVE_POLLS):
            await c.report_failure("cheap")
        assert hung.dead  # killed, so it cannot come back with its models
        assert any(r["action"] == "WorkerLost(cheap)" for r in c.log)
        await c.tick()  # re-discovered with a fresh worker; "a" placed again
        assert fleet.handles["cheap"] is not hung
        assert c.model_status("a")["state"] == "active"
    run(scenario)


def test_unknown_device_and_model_are_clear_errors():
    from cluster.errors import UnknownDeviceError, UnknownModelError

    async def scenario(c, fleet, router):
        with pytest.raises(UnknownDeviceError, match="device 'nope' is unknown") as e:
            await c.load("a", "nope")
        assert (e.value.status, e.value.code) == (404, "device_not_found")
        with pytest.raises(UnknownModelError, match="not in the catalog"):
            await c.load("zzz")
    run(scenario)
