"""``shoal bench overhead``: what Shoal's front door adds to a request.

One run, one machine, one tiny model, the same prompt and ``max_tokens``,
requests one at a time (latency, not throughput), three ways:

- ``direct``: the engine worker's ``generate`` stream, called from this
  driver (no HTTP, no routing): the floor;
- ``shoal``: ``POST /v1/completions`` through Shoal's Serve app (ingress,
  route cache, vLLM's OpenAI layer next to the engine);
- ``rayserve_llm``: ``ray.serve.llm.build_openai_app`` serving the same model
  on CPU, the reference Ray Serve LLM stack.

Warm-up requests (cold start, first compile) are excluded. Medians in ms.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from cluster.bench import servers

PROMPT = "The tide comes in twice a day and the boats"
MAX_TOKENS = 8
MODEL = "tiny-llama-a"


def _timed(fn, n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _post(url: str, model: str) -> None:
    import httpx

    r = httpx.post(url, json={"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                              "temperature": 0}, timeout=300)
    r.raise_for_status()
    assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS


def _direct(path: str, n: int) -> list[float]:
    import ray

    from cluster.catalog import ModelSpec
    from cluster.engine.device import DeviceSpec
    from cluster.engine.worker import start_engine_worker

    spec = ModelSpec(name=MODEL, path=path, family="tiny-llama",
                     kv_cache_bytes=servers.KV_BYTES).resolved()
    w = start_engine_worker(DeviceSpec("bench-direct", "cpu", 2**30))
    ray.get(w.load.remote(spec))
    sampling = {"temperature": 0, "max_tokens": MAX_TOKENS}

    def once():
        chunks = [ray.get(r) for r in w.generate.remote(MODEL, PROMPT, sampling=sampling)]
        assert sum(len(c["token_ids"]) for c in chunks) == MAX_TOKENS
    try:
        return _timed(once, n)
    finally:
        ray.get(w.shutdown.remote())
        ray.kill(w)


def run_overhead_bench(models_dir: str = ".shoal/models", requests: int = 30,
                       port: int = 8011,
                       worker_niceness: int = servers.WORKER_NICENESS) -> dict:
    from cluster.testing.tiny_models import make_test_models

    path = str(make_test_models(Path(models_dir), [MODEL])[MODEL].resolve())
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    with servers.ray_serve(port, worker_niceness):
        direct = _direct(path, requests)
        with servers.shoal(servers.one_model_catalog(path, MODEL), port) as url:
            shoal = _timed(lambda: _post(f"{url}/v1/completions", MODEL), requests)
        with servers.rayserve_llm(path, MODEL, port) as url:
            rayllm = _timed(lambda: _post(f"{url}/v1/completions", MODEL), requests)
    p50 = {k: statistics.median(v) for k, v in
           {"direct": direct, "shoal": shoal, "rayserve_llm": rayllm}.items()}
    return {
        "model": MODEL, "max_tokens": MAX_TOKENS, "requests": requests,
        "ray_worker_niceness": worker_niceness,
        "direct_ms_p50": round(p50["direct"], 2),
        "shoal_ms_p50": round(p50["shoal"], 2),
        "rayserve_llm_ms_p50": round(p50["rayserve_llm"], 2),
        "shoal_over_direct_ms": round(p50["shoal"] - p50["direct"], 2),
        "shoal_over_rayserve_llm": round(p50["shoal"] / p50["rayserve_llm"], 3),
        "goal": "shoal_ms_p50 <= rayserve_llm_ms_p50",
        "goal_met": p50["shoal"] <= p50["rayserve_llm"],
    }
