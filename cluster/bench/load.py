"""``shoal bench load``: a bounded open-loop load generator on loopback.

Eight tiny models behind Shoal's OpenAI front door on a local Ray
instance: a time-shared group (``tiny-llama-a..f``, one family, one
time-sharing CPU device that holds one model: one engine, turns between
decode steps) and two dedicated ones (``tiny-llama-g`` and ``tiny-qwen``, a
CPU device each). Each rate replays a seeded Poisson trace
(``timeshare.make_trace``: models uniform, prompts 16-96 tokens, short
lognormal outputs) for ``duration_s``, half the requests streamed, through
the ``openai`` client (``cluster/bench/client.py``: every request with a
hard timeout; at most ``CONCURRENCY`` in flight, far above what the server
admits, so arrivals do not wait for answers).

Rates step up by ``factor`` from the first until a rate that is not
sustained is measured at or past twice the sustainable rate
(``outcomes.next_rate``). A rate is sustained when at least 95% of its
requests complete within the SLO. Overload is answered by the front
door's admission: the bench's tenant may have ``MAX_CONCURRENT`` requests
in flight (429 with ``Retry-After`` past that); the JSON says so, and
measures how fast those answers come.

How every request ended, and what ``lost`` means: ``cluster/bench/outcomes.py``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from cluster.bench import servers
from cluster.bench.client import make_client, send
from cluster.bench.outcomes import (SLO, load_goals, next_rate, summarize, sustainable_rate)
from cluster.bench.timeshare import KV_BYTES, MAX_MODEL_LEN, STILL_POLICY, make_trace
from cluster.catalog import ModelSpec
from cluster.testing.tiny_models import make_test_models

TIMESHARED = [f"tiny-llama-{x}" for x in "abcdef"]
DEDICATED = {"tiny-llama-g": "load-llama-g", "tiny-qwen": "load-qwen"}
TS_DEVICE = "load-timeshare"
SLO_TARGETS = SLO(ttft_s=2.5, tpot_s=0.05)
GOAL = 0.95  # sustained: this fraction complete within the SLO
OVERLOAD_BOUND_S = 1.0  # 429/503 answers: p99 under this
MAX_CONCURRENT = 24  # the bench tenant's admission limit at the front door
CONCURRENCY = 1024  # the client's own bound: open-loop below it
TIMEOUT_S = 60.0  # every request, the whole exchange
OUTPUT = (32, 0.5, 96)  # output tokens: lognormal median, sigma, max
KEY = "sk-shoal-load-bench"
PAST = 2.0  # run to this multiple of the sustainable rate


def _catalog(models_dir: str, n_models: int) -> tuple[dict, list[str]]:
    """The catalog: the time-shared group plus the dedicated models, each
    kept on its device by ``allowed_accelerators`` (CPU devices with an
    accelerator type of their own), and the bench's tenant."""
    n_ts = max(2, n_models - len(DEDICATED))
    group = [f"tiny-llama-{chr(ord('a') + i)}" for i in range(n_ts)]
    if len(group) > 6:
        raise ValueError(f"at most {6 + len(DEDICATED)} models (tiny-llama-a..f time-shared)")
    names = group + list(DEDICATED)
    paths = make_test_models(models_dir, names)
    slo = {"ttft_s": SLO_TARGETS.ttft_s, "tpot_s": SLO_TARGETS.tpot_s}

    def model(name: str, family: str, accel: str) -> dict:
        return {"name": name, "path": str(Path(paths[name]).resolve()), "family": family,
                "max_model_len": MAX_MODEL_LEN, "kv_cache_bytes": KV_BYTES, "slo": slo,
                "allowed_accelerators": [accel]}
    models = [model(m, "tiny-llama", "ts") for m in group]
    models += [model(m, "tiny-qwen" if m == "tiny-qwen" else "tiny-llama", dev)
               for m, dev in DEDICATED.items()]
    footprint = max(ModelSpec(**m).resolved().weights_bytes for m in models) + KV_BYTES
    devices = [{"id": TS_DEVICE, "memory_bytes": footprint + 2**20, "accelerator_type": "ts",
                "timeshare": {"discipline": "token"}}]
    devices += [{"id": dev, "memory_bytes": footprint + 2**20, "accelerator_type": dev}
                for dev in DEDICATED.values()]
    return {"models": models, "cpu_devices": devices,
            "controller": {"policy_config": STILL_POLICY},
            "tenants": {"bench": {"key": KEY, "max_concurrent": MAX_CONCURRENT}}}, names


async def _place(client, names: list[str]) -> float:
    """One request per model, in turn: engines start, the group joins one."""
    t = time.monotonic()
    for i, m in enumerate(names):
        o = await send(client, m, [16 + i, 17, 18, 19], 2, False, timeout_s=300)
        if o.ending.value != "ok":
            raise RuntimeError(f"placing {m}: {o}")
    return time.monotonic() - t


async def _rate(client, rate: float, duration_s: float, seed: int, vocab: int,
                names: list[str]) -> tuple[list, float]:
    """One rate: the trace's arrivals over ``duration_s``, every request to
    its end (bounded by its timeout). The outcomes and the wall time."""
    import numpy as np

    n = max(1, round(rate * duration_s))
    trace = make_trace(rate, n, seed, vocab, OUTPUT, models=names)
    streamed = np.random.default_rng(seed + 7).random(n) < 0.5
    gate = asyncio.Semaphore(CONCURRENCY)
    t0 = time.monotonic()

    async def one(req: dict, streaming: bool):
        await asyncio.sleep(max(0.0, t0 + req["at"] - time.monotonic()))
        async with gate:
            return await send(client, req["model"], req["prompt_token_ids"], req["max_tokens"],
                              bool(streaming), TIMEOUT_S, request_id=f"load-{rate}-{req['id']}")
    out = await asyncio.gather(*(one(r, s) for r, s in zip(trace, streamed)))
    return list(out), time.monotonic() - t0


async def _bench(url: str, names: list[str], rates: list[float], factor: float,
                 max_rates: int, duration_s: float, seed: int, vocab: int) -> dict:
    client = make_client(url, KEY)
    setup_s = await _place(client, names)
    rows: list[dict] = []
    queue = sorted(rates)
    rate: float | None = queue.pop(0)
    while rate is not None:
        outcomes, wall = await _rate(client, rate, duration_s, seed + len(rows), vocab, names)
        row = {"rate": rate, **summarize(outcomes, SLO_TARGETS), "wall_s": round(wall, 2),
               "streamed": sum(o.streaming for o in outcomes)}
        rows.append(row)
        print(f"[load] rate {rate:g}/s: {row['successes']}/{row['requests']} ok, "
              f"attainment {row['slo_attainment']}, refused {row['errors_by_status']}, "
              f"lost {row['lost']} {row['lost_by_why']}, overload p99 "
              f"{row['overload_s_p99']}", file=sys.stderr)
        rate = queue.pop(0) if queue else next_rate(rows, GOAL, factor, PAST, max_rates)
    await client.close()
    best = sustainable_rate(rows, GOAL)
    return {"models": names, "timeshared_group": [m for m in names if m in TIMESHARED],
            "dedicated": [m for m in names if m in DEDICATED],
            "path": "OpenAI front door, openai client (async), streamed and not",
            "setup_s": round(setup_s, 2),
            "slo": {"ttft_s": SLO_TARGETS.ttft_s, "tpot_s": SLO_TARGETS.tpot_s,
                    "non_streaming": "e2e <= ttft_s + tpot_s * (tokens - 1)"},
            "sustained_means": f">= {GOAL} of requests complete within the SLO",
            "admission": f"tenant max_concurrent {MAX_CONCURRENT} (429 + Retry-After past it)",
            "trace": {"arrivals": "poisson", "seed": seed, "duration_s_per_rate": duration_s,
                      "streamed_fraction": 0.5, "models": "uniform",
                      "output_tokens": {"lognormal_median": OUTPUT[0], "sigma": OUTPUT[1],
                                        "max": OUTPUT[2]}, "prompt_tokens": "16-96",
                      "timeout_s": TIMEOUT_S, "client_concurrency_bound": CONCURRENCY},
            "lost_means": "sent, and neither a complete response nor a clear error: a "
                          "timeout, a dropped connection, a short body, a stream without "
                          "[DONE] and without an error event",
            "by_rate": rows, "sustainable_rate": best,
            "max_rate_over_sustainable": round(max(r["rate"] for r in rows) / best, 2)
            if best else None,
            **load_goals(rows, OVERLOAD_BOUND_S)}


def run_load_bench(models_dir: str, rates: list[float] | None = None, factor: float = 2.0,
                   max_rates: int = 7, duration_s: float = 20.0, n_models: int = 8,
                   seed: int = 0, port: int = 8017) -> dict:
    if n_models < 8:
        raise ValueError(f"--models must be at least 8 (the issue's floor), got {n_models}")
    catalog, names = _catalog(models_dir, n_models)
    vocab = json.loads((Path(catalog["models"][0]["path"]) / "config.json").read_text())[
        "vocab_size"]
    with servers.ray_serve(port), servers.shoal(catalog, port) as url:
        return asyncio.run(_bench(url, names, rates or [1.0], factor, max_rates, duration_s,
                                  seed, vocab))
