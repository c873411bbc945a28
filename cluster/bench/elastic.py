"""``shoal bench elastic``: how long a request waits for a model whose
device the pool must first get from Ray's autoscaler.

One run on Ray's real autoscaler (v2) with the fake multi-node provider
(``ray_configs/autoscale-fake.yaml``, ``cluster/testing/fake_autoscaler.py``):
the pool starts empty; the one model may run only on an H100, and the
autoscaler can add H100 nodes (logical GPUs; the engine runs
vLLM on CPU). Measured in that one run:

- ``first_token_s``: the first request (a streaming completion) -> its first token;
- ``node_up_s``: the same request -> the new node alive in Ray;
- ``engine_start_s``: the controller's load of the model on that node
  (the engine worker actor ready, then the vLLM engine started);
- ``overhead_s``: first_token_s - node_up_s - engine_start_s, i.e. what Shoal
  adds around the node and the engine (queueing, discovery, routing);
- ``idle_to_removed_s``: the request done -> the node gone: the model's idle
  unload, the device released, the request withdrawn, the autoscaler's idle
  timeout (the settings are in the JSON).

The goal: ``first_token_s <= node_up_s + engine_start_s + 5``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

MODEL = "tiny-llama-a"
PROMPT = "The tide comes in twice a day and the boats"
MiB = 2**20
KV_BYTES = 64 * MiB
GOAL_SLACK_S = 5.0


def elastic_catalog(models: dict[str, dict], device_bytes: int, policy: dict | None = None,
                    capacity: dict | None = None, controller: dict | None = None) -> dict:
    """A catalog for the fake autoscaling cluster: ``models`` (name -> entry)
    and the two addable types of autoscale-fake.yaml, each device holding
    ``device_bytes``. No CPU device: the pool starts empty."""
    return {
        "models": [{"name": n, "kv_cache_bytes": KV_BYTES, **m} for n, m in models.items()],
        "discovery": {"emulate_accelerators_on_cpu": True, "accelerators": {
            "H100": {"memory_bytes": device_bytes, "speed": 1.0, "cost_per_hour": 3.0},
            "AMD-Instinct-MI300X-OAM": {"memory_bytes": device_bytes, "speed": 1.0,
                                        "cost_per_hour": 4.0}}},
        # As the node types of autoscale-fake.yaml allow.
        "capacity": {"accelerators": {"H100": {"max_devices": 2},
                                      "AMD-Instinct-MI300X-OAM": {"max_devices": 2}},
                     **(capacity or {})},
        "controller": {"tick_s": 0.5, "health_check_s": 1.0, "load_timeout_s": 600,
                       "policy_config": policy or {}, **(controller or {})},
    }


def deploy(address: str, catalog: dict, port: int) -> str:
    """Shoal's app on the cluster at ``address`` (this process becomes its
    driver); returns the URL once /health answers."""
    import ray
    from ray import serve

    from cluster.bench.servers import wait_healthy
    from serve_apps.app import build_app

    if not ray.is_initialized():
        ray.init(address=address, namespace="shoal", log_to_driver=False)
    # One proxy, on the head: fake nodes share this machine's ports.
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(build_app({"catalog": catalog}), name="shoal", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url


def undeploy(address: str) -> None:
    """Stop every engine worker, the controller and Serve (``shoal down``)."""
    import ray

    from serve_apps.app import shutdown_app

    if not ray.is_initialized():
        ray.init(address=address, namespace="shoal", log_to_driver=False)
    shutdown_app()


def _h100_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes()
            if n["Alive"] and "accelerator_type:H100" in n["Resources"]]


def _watch(pred, every_s: float = 0.05) -> dict:
    """Record the first time ``pred()`` holds, from a thread."""
    seen: dict = {}

    def loop():
        while "at" not in seen and not seen.get("stop"):
            if pred():
                seen["at"] = time.monotonic()
            time.sleep(every_s)
    threading.Thread(target=loop, daemon=True).start()
    return seen


def _first_token(url: str) -> tuple[float, int]:
    """Seconds from sending a streaming completion to its first token, and
    the chunks with text it streamed."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
    t0, first, chunks = time.monotonic(), None, 0
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                           temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            first = first or time.monotonic() - t0
            chunks += 1
    return first, chunks


def _controller_timeline(url: str, t0_wall: float) -> dict:
    """From the controller's status, seconds after the request: when the new
    device's worker first answered (``worker_ready``), when the load began
    and ended; and how long the load took (``engine_start_s``)."""
    import httpx

    status = httpx.get(f"{url}/admin/status", timeout=30).json()
    devs = {d["id"] for d in status["devices"] if d["accelerator_type"] == "H100"}
    loads = [a for a in status["recent_actions"] if a["action"].startswith("Load(")
             and f"model='{MODEL}'" in a["action"]
             and any(f"device='{d}'" in a["action"] for d in devs) and "error" not in a]
    seen = [status["capacity"]["first_seen"][d] for d in devs
            if d in status["capacity"]["first_seen"]]
    out: dict = {"engine_start_s": loads[-1]["duration_s"] if loads else None,
                 "worker_lost": sum(a["action"].startswith("WorkerLost") for a in
                                    status["recent_actions"]),
                 "failed_actions": [f"{a['action'].split('(')[0]} at "
                                    f"{a['at'] - t0_wall:.1f} s: {a['error'][:300]}"
                                    for a in status["recent_actions"] if "error" in a]}
    if seen:
        out["worker_ready"] = round(min(seen) - t0_wall, 3)
    if loads:
        out["load_began"] = round(loads[-1]["at"] - loads[-1]["duration_s"] - t0_wall, 3)
        out["load_ended"] = round(loads[-1]["at"] - t0_wall, 3)
    return out


def run_elastic_bench(models_dir: str = ".shoal/models") -> dict:
    import ray

    from cluster.testing.fake_autoscaler import FakeAutoscalingCluster, free_port
    from cluster.testing.tiny_models import make_test_models

    path = str(make_test_models(Path(models_dir), [MODEL])[MODEL].resolve())
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    footprint = Path(path, "model.safetensors").stat().st_size + KV_BYTES
    settings = {"idle_unload_s": 5.0, "release_idle_s": 2.0, "min_node_lifetime_s": 0.0,
                "shrink_delay_s": 1.0, "autoscaler_idle_timeout_s": 6.0}
    catalog = elastic_catalog(
        {MODEL: {"path": path, "family": "tiny-llama", "allowed_accelerators": ["H100"]}},
        2 * footprint, policy={"idle_unload_s": settings["idle_unload_s"]},
        capacity={k: settings[k] for k in ("release_idle_s", "min_node_lifetime_s",
                                           "shrink_delay_s")})
    cluster = FakeAutoscalingCluster(
        overrides={"idle_timeout_minutes": settings["autoscaler_idle_timeout_s"] / 60})
    cluster.start()
    try:
        ray.init(address=cluster.address, namespace="shoal", log_to_driver=False)
        url = deploy(cluster.address, catalog, free_port())
        assert not _h100_nodes(), "an H100 node before any request"
        t0, t0_wall = time.monotonic(), time.time()
        up = _watch(lambda: bool(_h100_nodes()))
        first_token_s, chunks = _first_token(url)
        done = time.monotonic()
        timeline = _controller_timeline(url, t0_wall)
        engine_start_s = timeline.pop("engine_start_s")
        gone = _watch(lambda: not _h100_nodes(), every_s=0.2)
        deadline = time.monotonic() + 300
        while "at" not in gone and time.monotonic() < deadline:
            time.sleep(0.2)
        up["stop"] = gone["stop"] = True
    finally:
        try:
            undeploy(cluster.address)
        finally:
            ray.shutdown()
            cluster.stop()
    node_up_s = up["at"] - t0 if "at" in up else None
    measured = None not in (first_token_s, node_up_s, engine_start_s)
    bound = node_up_s + engine_start_s + GOAL_SLACK_S if measured else None
    return {
        "model": MODEL, "streamed_chunks": chunks,
        "first_token_s": _round(first_token_s), "node_up_s": _round(node_up_s),
        "engine_start_s": _round(engine_start_s),
        "overhead_s": _round(first_token_s - node_up_s - engine_start_s) if measured else None,
        "idle_to_removed_s": _round(gone["at"] - done) if "at" in gone else None,
        # Seconds after the request, from the controller's records: where
        # the time between the node and the first token went.
        "timeline_s": {"node_up": _round(node_up_s), **timeline,
                       "first_token": _round(first_token_s)},
        "settings": settings,
        "goal": f"first_token_s <= node_up_s + engine_start_s + {GOAL_SLACK_S:g}",
        # Never claimed on a missing number.
        "goal_met": first_token_s <= bound if measured else None,
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


if __name__ == "__main__":
    # For tests that must not become this cluster's driver themselves:
    #   python -m cluster.bench.elastic deploy ADDRESS CATALOG_JSON PORT
    #   python -m cluster.bench.elastic undeploy ADDRESS
    import json

    if sys.argv[1] == "deploy":
        print(deploy(sys.argv[2], json.loads(Path(sys.argv[3]).read_text()), int(sys.argv[4])))
    else:
        undeploy(sys.argv[2])
