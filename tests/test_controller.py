"""The placement controller on a multi-node Ray cluster, real vLLM on CPU.

The cluster (tests/conftest.py) has an "A100" node and an "L4" node; the
controller discovers one device on each from Ray's resources. The tests run
in order and share one controller; each says what state it leaves.
"""

from __future__ import annotations

import asyncio

import pytest
import ray

from cluster.catalog import load_catalog
from cluster.control.controller import CONTROLLER_NAME, get_or_create_controller
from cluster.control.fleet import NAMESPACE, worker_actor_name
from cluster.control.router import Router
from cluster.errors import ColdStartQueueFullError, LoadTimeoutError, UnknownModelError
from tests.conftest import KV_BYTES, MiB
from tests.helpers import GREEDY, LONG_PROMPT, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.ray]

LLAMAS = ["tiny-llama-a", "tiny-llama-b", "tiny-llama-c"]


@pytest.fixture(scope="module")
def catalog(tiny_models, spec):
    footprint = spec("tiny-llama-a").weights_bytes + KV_BYTES
    models = [{"name": n, "path": str(tiny_models[n]), "family": "tiny-llama",
               "kv_cache_bytes": KV_BYTES} for n in LLAMAS]
    models += [
        # Only fits the L4: asking for it there is what forces an eviction.
        {"name": "tiny-qwen", "path": str(tiny_models["tiny-qwen"]), "family": "tiny-qwen",
         "kv_cache_bytes": KV_BYTES, "allowed_accelerators": ["L4"]},
        # No such device in the cluster: it can only wait, then time out.
        {"name": "needs-amd", "path": str(tiny_models["tiny-llama-a"]), "family": "tiny-llama",
         "kv_cache_bytes": KV_BYTES, "allowed_vendors": ["amd"]},
    ]
    return load_catalog({
        "models": models,
        "discovery": {"emulate_accelerators_on_cpu": True, "accelerators": {
            # A100: fast and dear, room for two engines; L4: cheap, room for one.
            "A100": {"memory_bytes": 2 * footprint + 8 * MiB, "speed": 2.0, "cost_per_hour": 3.0},
            "L4": {"memory_bytes": footprint + 8 * MiB, "speed": 1.0, "cost_per_hour": 1.0}}},
        # Ticks are driven by the tests (and by cold-start events) so every
        # decision happens at a known point.
        "controller": {"tick_s": 0, "health_check_s": 1.0, "cold_queue_max": 2,
                       "policy_config": {"idle_unload_s": 3600}},
    })


@pytest.fixture(scope="module")
def controller(ray_local, catalog):
    c = get_or_create_controller(catalog)
    ray.get(c.ping.remote())
    yield c
    ray.get(c.shutdown_cluster.remote())
    ray.kill(c, no_restart=True)


def run(coro):
    return asyncio.get_event_loop().run_until_complete(coro)


async def stream_all(router: Router, model: str, sampling=GREEDY) -> tuple[list[int], list[dict]]:
    chunks = [c async for c in router.stream(model, LONG_PROMPT, sampling=sampling)]
    return [t for c in chunks for t in c["token_ids"]], chunks


def status(controller) -> dict:
    return ray.get(controller.status.remote())


def where(controller, model: str) -> dict:
    return next(m for m in status(controller)["models"] if m["name"] == model)["devices"]


def device_of(controller, accel: str) -> str:
    return next(d["id"] for d in status(controller)["devices"] if d["accelerator_type"] == accel)


def test_discovers_one_device_per_accelerator_node(controller):
    devs = {d["accelerator_type"]: d for d in status(controller)["devices"]}
    assert set(devs) == {"A100", "L4"}
    assert devs["A100"]["vendor"] == "nvidia" and devs["A100"]["speed"] == 2.0
    assert devs["A100"]["node"] != devs["L4"]["node"]  # pinned to their own nodes
    assert all(d["alive"] for d in devs.values())


def test_cold_load_on_demand(controller, references):
    """A request for a cold model waits in the queue, the policy loads it, the
    stream completes with the model's own greedy output."""
    assert all(m["state"] == "cold" for m in status(controller)["models"])
    router = Router(controller)
    ids, chunks = run(stream_all(router, "tiny-llama-a"))
    assert ids == references["tiny-llama-a"]
    assert chunks[-1]["finished"]
    placed = where(controller, "tiny-llama-a")
    assert list(placed.values()) == ["active"]
    # Cold and small goes to the cheap device.
    assert list(placed) == [device_of(controller, "L4")]


def test_cold_models_co_locate_by_swapping_in_place(controller, references):
    """B and C join A's device as parked copies and swap into its engine:
    three models on one device, one engine, no new engine start."""
    l4 = device_of(controller, "L4")
    router = Router(controller)
    for m in ("tiny-llama-b", "tiny-llama-c"):
        ids, _ = run(stream_all(router, m))
        if m in references:
            assert ids == references[m]
    for m in LLAMAS:
        assert list(where(controller, m)) == [l4], m
    dev = next(d for d in status(controller)["devices"] if d["id"] == l4)
    assert sorted(dev["models"]) == LLAMAS
    states = sorted(where(controller, m)[l4] for m in LLAMAS)
    assert states == ["active", "parked", "parked"]
    swaps = [a for a in status(controller)["recent_actions"] if a["action"].startswith("Swap(")]
    assert swaps and not any("error" in a for a in swaps)
    # A is still right after being swapped out and back in.
    assert run(stream_all(router, "tiny-llama-a"))[0] == references["tiny-llama-a"]


def test_unknown_model_and_cold_start_limits(controller):
    with pytest.raises(UnknownModelError, match="not in the catalog"):
        ray.get(controller.resolve.remote("no-such-model"))
    # needs-amd can never be placed: requests wait, a third is refused, and
    # the waiters time out with a clear 503 naming why.
    refs = [controller.resolve.remote("needs-amd", 3.0) for _ in range(2)]
    wait_until(lambda: next(m for m in status(controller)["models"]
                            if m["name"] == "needs-amd")["queue"] == 2)
    with pytest.raises(ColdStartQueueFullError) as full:
        ray.get(controller.resolve.remote("needs-amd", 3.0))
    assert full.value.status == 503 and full.value.retry_after_s > 0
    for r in refs:
        with pytest.raises(LoadTimeoutError, match="needs-amd"):
            ray.get(r)
    reqs = status(controller)["capacity_requests"]
    assert any(r["for_model"] == "needs-amd" for r in reqs)


def test_eviction_under_memory_pressure(controller):
    """tiny-qwen may only run on the L4, which is full with the llama engine:
    the least-demanded model there is evicted and qwen loads."""
    l4 = device_of(controller, "L4")
    router = Router(controller)
    ids, chunks = run(stream_all(router, "tiny-qwen"))
    assert len(ids) == GREEDY["max_tokens"] and chunks[-1]["finished"]
    assert where(controller, "tiny-qwen") == {l4: "active"}
    l4_status = next(d for d in status(controller)["devices"] if d["id"] == l4)
    assert l4_status["memory_used_bytes"] <= l4_status["memory_budget_bytes"]
    evicted = [a for a in status(controller)["recent_actions"]
               if a["action"].startswith(("Unload(", "Park(")) and l4 in a["action"]]
    assert evicted, "\n".join(a["action"] + " " + a.get("error", "") for a in status(controller)["recent_actions"])


def settle(controller) -> None:
    """Wait until the controller executes nothing and no copy is loading."""
    wait_until(lambda: not (s := status(controller))["busy"] and not any(
        "loading" in m["devices"].values() for m in s["models"]), timeout_s=180, every_s=0.5)


def test_controller_restart_rebuilds_state(controller):
    settle(controller)
    before = {m["name"]: m["devices"] for m in status(controller)["models"]}
    version = ray.get(controller.ping.remote())
    ray.kill(controller, no_restart=False)  # Ray restarts it (max_restarts=-1)
    # The kill is asynchronous: the old incarnation may still answer a ping,
    # so wait for the new one, whose versions start above the old one's.
    wait_until(lambda: (_ping(controller) or 0) > version, timeout_s=60)
    after = {m["name"]: m["devices"] for m in status(controller)["models"]}
    assert after == before
    assert ray.get(controller.ping.remote()) > version  # versions never go back
    assert ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)


# Long enough to still be running when the migration evacuates it: a slow
# client lets the worker run BACKPRESSURE relay windows ahead (4 x 100 ms),
# which at 60 tokens (as this was) held the whole answer on a fast machine,
# and the stream finished before it could move.
LONG = {"temperature": 0.0, "max_tokens": 450, "ignore_eos": True}


def test_consolidation_migrates_a_model_with_a_stream_in_flight(controller):
    """Two cold models on two devices; the policy empties the L4 by migrating
    its model to the A100, make-before-break, while a stream is in flight.
    The stream moves with it: no duplicated or missing tokens, and the
    output equals the run without migration."""
    for m in ("tiny-qwen", *LLAMAS):  # a clean slate; demand forgotten
        ray.get(controller.unload.remote(m))
    l4, a100 = device_of(controller, "L4"), device_of(controller, "A100")
    ray.get(controller.load.remote("tiny-llama-a", l4))
    ray.get(controller.load.remote("tiny-llama-b", a100))
    router = Router(controller)
    reference, _ = run(stream_all(router, "tiny-llama-a", LONG))

    stream = router.stream("tiny-llama-a", LONG_PROMPT, sampling=LONG)
    head = [run(stream.__anext__()) for _ in range(2)]  # the client reads slowly
    assert where(controller, "tiny-llama-a")[l4] == "active"
    actions = ray.get(controller.tick.remote())
    migrations = [a for a in actions if a["action"].startswith("Migrate(")]
    assert len(migrations) == 1 and "error" not in migrations[0], actions
    assert where(controller, "tiny-llama-a") == {a100: "active"}
    assert where(controller, "tiny-llama-b") == {a100: "active"}
    assert next(d for d in status(controller)["devices"] if d["id"] == l4)["models"] == []

    async def rest():
        return [c async for c in stream]
    chunks = head + run(rest())
    ids = [t for c in chunks for t in c["token_ids"]]
    assert ids == reference
    assert router.hops == 1  # it really was resumed on the target
    assert chunks[-1]["finished"] and chunks[-1]["num_generated"] == LONG["max_tokens"]


def test_killed_worker_models_are_re_placed_and_streams_resume(controller):
    """The A100's worker dies mid-stream: the controller notices, re-places
    its models, and the router resumes the stream on the new copy."""
    a100 = device_of(controller, "A100")
    router = Router(controller)
    reference, _ = run(stream_all(router, "tiny-llama-a", LONG))
    stream = router.stream("tiny-llama-a", LONG_PROMPT, sampling=LONG)
    head = [run(stream.__anext__()) for _ in range(2)]
    ray.kill(ray.get_actor(worker_actor_name(a100), namespace=NAMESPACE))

    async def rest():
        return [c async for c in stream]
    chunks = head + run(rest())
    assert [t for c in chunks for t in c["token_ids"]] == reference
    assert router.hops == 1
    # Both models that lived on the dead worker are active again somewhere.
    wait_until(lambda: all(list(where(controller, m).values()) == ["active"]
                           for m in ("tiny-llama-a", "tiny-llama-b")), timeout_s=180)
    lost = [a for a in status(controller)["recent_actions"] if a["action"].startswith("WorkerLost")]
    assert lost and a100 in lost[-1]["action"]
    assert all(d["alive"] for d in status(controller)["devices"])  # a fresh worker


def _ping(controller) -> int | None:
    try:
        return ray.get(controller.ping.remote(), timeout=5)
    except Exception:
        return None
