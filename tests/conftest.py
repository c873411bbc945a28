"""Shared fixtures. Engines are expensive (~20 s each here), so one engine
worker with two shells is built per session and the engine tests share it.
No test has to put it back: the ``worker`` fixture brings it to its baseline
state before every test (``at_baseline``), whatever the test before did."""

from __future__ import annotations

import os

import pytest

from cluster.ops.lifecycle import REAP_ENV

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# vLLM's engine-core processes outlive a SIGKILLed engine worker (the
# killed-worker tests do that); the raylet reaps them when it is a subreaper.
os.environ.setdefault(REAP_ENV, "true")

MiB = 2**20
KV_BYTES = 64 * MiB  # per shell; tiny models need very little


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from cluster.testing.tiny_models import make_test_models

    names = ["tiny-llama-a", "tiny-llama-b", "tiny-llama-c", "tiny-qwen"]
    return make_test_models(tmp_path_factory.mktemp("models"), names)


# The test cluster: a head node plus two nodes that declare different
# accelerators (engines on them run vLLM on CPU: see
# ``discovery.emulate_accelerators_on_cpu``). One Ray session serves the
# whole suite, so engine tests and controller tests share it.
ACCEL_NODES = {"A100": {"shoal-node-a100": 1}, "L4": {"shoal-node-l4": 1}}


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for accel, extra in ACCEL_NODES.items():
        cluster.add_node(num_cpus=0, num_gpus=1,
                         resources={f"accelerator_type:{accel}": 1, **extra})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_local(ray_cluster):
    import ray

    return ray


@pytest.fixture(scope="session")
def spec(tiny_models):
    from cluster.catalog import ModelSpec

    def make(name: str, **kw) -> ModelSpec:
        family = "tiny-qwen" if name == "tiny-qwen" else "tiny-llama"
        return ModelSpec(name=name, path=str(tiny_models[name]), family=family,
                         kv_cache_bytes=KV_BYTES, **kw).resolved()
    return make


BASELINE_ACTIVE = ("tiny-llama-a", "tiny-llama-b")  # each in a shell of its own
BASELINE_PARKED = ("tiny-llama-c",)  # host cache only


@pytest.fixture(scope="session")
def shared_worker(ray_local, spec):
    """A CPU device whose budget fits exactly two tiny shells, built once.
    Take it through ``worker`` (or ``at_baseline``), never directly."""
    from cluster.engine.device import DeviceSpec
    from cluster.engine.worker import start_engine_worker

    footprint = spec("tiny-llama-a").weights_bytes + KV_BYTES
    w = start_engine_worker(DeviceSpec("cpu-test", "cpu", 2 * footprint + 8 * MiB))
    ray_local.get([w.load.remote(spec(m)) for m in BASELINE_ACTIVE])
    yield w
    ray_local.get(w.shutdown.remote())


def at_baseline(w, spec):
    """Bring the shared worker to its baseline with idempotent verbs: A and B
    active (in shells of their own), C parked, nothing else loaded, no
    vacant shell. Costs one stats call when nothing changed."""
    import ray

    from cluster.engine.contract import ModelState

    models = ray.get(w.stats.remote()).models
    for name, m in models.items():
        if name not in BASELINE_ACTIVE + BASELINE_PARKED:
            ray.get(w.unload.remote(name))
        elif name in BASELINE_PARKED and m.state is not ModelState.PARKED:
            ray.get(w.park.remote(name))
    ray.get([w.load.remote(spec(m)) for m in BASELINE_ACTIVE])  # wakes a parked one
    ray.get([w.load.remote(spec(m), park=True) for m in BASELINE_PARKED])
    ray.get(w.drop_vacant_shells.remote())
    return w


@pytest.fixture
def worker(shared_worker, spec):
    """The shared engine worker at its baseline, before every test."""
    return at_baseline(shared_worker, spec)


@pytest.fixture(scope="session")
def references(shared_worker, spec):
    """Greedy outputs (LONG_PROMPT, GREEDY) of A and B, each from an engine
    of its own: what every swapped, moved or resumed run must equal."""
    from tests.helpers import GREEDY, LONG_PROMPT, collect

    w = at_baseline(shared_worker, spec)
    return {m: collect(w.generate.remote(m, LONG_PROMPT, sampling=GREEDY))[0]
            for m in BASELINE_ACTIVE}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ADMIN_KEY = "test-admin-key"
# The front door's tenants (catalog ``tenants``). The suite's own clients use
# SUITE_KEY (every model, no limits); requests with no Authorization header
# (raw httpx, gRPC without metadata) are the anonymous tenant's (every
# model, no limits), so the tests written before tenants run unchanged. The
# others are for tests/test_front_door.py's tenant tests. The keys are
# distinctive so a grep of the logs for them means something.
SUITE_KEY = "sk-shoal-suite-4b1f0c9e"
TENANT_KEYS = {"solo": "sk-shoal-solo-9d27e3a1", "thrifty": "sk-shoal-thrifty-71c58f02"}
WRONG_KEY = "sk-shoal-wrong-3e8a6d54"
TENANTS = {
    "suite": {"key": SUITE_KEY},
    "anon": {"anonymous": True},
    # Only tiny-llama-a exists for it, one request at a time.
    "solo": {"key": TENANT_KEYS["solo"], "models": ["tiny-llama-a"], "max_concurrent": 1},
    # Its first request takes it over budget for a minute.
    "thrifty": {"key": TENANT_KEYS["thrifty"], "models": ["tiny-llama-a"],
                "tokens_per_minute": 10},
}
# The front door's time-sharing device and its models (name -> checkpoint).
TIMESHARED_DEVICE = "cpu-timeshare-fd"
TIMESHARED_MODELS = {"ts-a": "tiny-llama-a", "ts-b": "tiny-llama-b"}
# Shoal's slack-driven turns, re-judged every 20 ms: a long stream is
# preempted whenever another model has work.
TIMESHARED_TURNS = {"discipline": "token", "min_quota_s": 0.02, "max_round_s": 0.02}


@pytest.fixture(scope="session")
def front_door(ray_local, tiny_models, spec):
    """The whole app on the test cluster: Serve HTTP + gRPC proxies, the
    controller, and 4 catalog models on the two accelerator nodes, all cold
    at the start (plus one that can never be placed), and two more
    (``TIMESHARED_MODELS``) that only a time-sharing CPU device on the head
    node takes, where they share one engine (one model's worth of memory).
    Yields {"url", "grpc", "controller", "catalog"}."""
    from ray import serve

    from cluster.control.controller import get_controller
    from serve_apps.app import build_app
    from serve_apps.grpc_service import GRPC_SERVICER

    footprint = spec("tiny-llama-a").weights_bytes + KV_BYTES
    on_gpus = {"kv_cache_bytes": KV_BYTES, "allowed_vendors": ["nvidia"]}
    models = [{"name": n, "path": str(tiny_models[n]), "family": "tiny-llama", **on_gpus}
              for n in ("tiny-llama-a", "tiny-llama-b", "tiny-llama-c")]
    models += [{"name": "tiny-qwen", "path": str(tiny_models["tiny-qwen"]), "family": "tiny-qwen",
                **on_gpus},
               {"name": "needs-amd", "path": str(tiny_models["tiny-llama-a"]),
                "family": "tiny-llama", "kv_cache_bytes": KV_BYTES, "allowed_vendors": ["amd"],
                "load_timeout_s": 3}]
    # Same checkpoints as tiny-llama-a/-b: their dedicated runs are the reference.
    models += [{"name": n, "path": str(tiny_models[src]), "family": "tiny-llama",
                "kv_cache_bytes": KV_BYTES, "allowed_vendors": ["cpu"]}
               for n, src in TIMESHARED_MODELS.items()]
    catalog = {
        "models": models,
        "cpu_devices": [{"id": TIMESHARED_DEVICE, "memory_bytes": footprint + 8 * MiB,
                         "timeshare": TIMESHARED_TURNS}],
        "discovery": {"emulate_accelerators_on_cpu": True, "accelerators": {
            "A100": {"memory_bytes": 2 * footprint + 8 * MiB, "speed": 2.0, "cost_per_hour": 3.0},
            "L4": {"memory_bytes": 2 * footprint + 8 * MiB, "speed": 1.0, "cost_per_hour": 1.0}}},
        "controller": {"tick_s": 2, "health_check_s": 1.0, "cold_queue_max": 2},
        "tenants": TENANTS,
    }
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]})
    serve.run(build_app({"catalog": catalog, "admin_key": ADMIN_KEY,
                         "rate_limits": {"tiny-llama-c": 0.2}}),
              name="shoal", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}",
           "controller": get_controller(), "catalog": catalog}
    import ray

    c = get_controller()
    ray.get(c.shutdown_cluster.remote())
    serve.shutdown()
    ray.kill(c, no_restart=True)


@pytest.fixture(scope="session")
def client(front_door):
    """The official ``openai`` client on the front door (no retries), as
    the ``suite`` tenant."""
    import openai

    return openai.OpenAI(base_url=f"{front_door['url']}/v1", api_key=SUITE_KEY,
                         max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def admin(front_door):
    """An HTTP client for the front door's admin API, with the admin key."""
    import httpx

    return httpx.Client(base_url=front_door["url"], timeout=300,
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"})
