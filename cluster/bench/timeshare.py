"""``shoal bench timeshare``: token-level vs request-level time-sharing.

Eight same-architecture tiny models on one CPU device whose memory budget
holds one model at a time: one engine, the models swapped in place. The same
seeded Poisson trace of streaming requests (uniform over the models,
ShareGPT-like lognormal output lengths) is replayed at a sweep of total
rates under two disciplines of the device scheduler (``cluster/engine/timeshare.py``):

- ``token``: Shoal's slack-driven turns, preempted between decode steps;
- ``aegaeon``: Aegaeon's fixed decode quotas, preempted likewise;
- ``request``: a model keeps the device until its requests are done.

SLOs are Aegaeon's defaults (TTFT 10 s, TPOT 100 ms, for a batched decode
step of about 25 ms on its GPUs) scaled by this machine's measured decode
step at a batch of ``STEP_BATCH``: ``scale = step / 0.025``; its 4 s round
bound is scaled alike. A request meets the SLO if its TTFT
and its TPOT (mean gap between tokens after the first) are both within.
``sustainable_rate`` is the highest measured rate at or below which every
rate reaches 95% attainment. Each rate replays ``repeats`` traces (other
seeds); a row pools their requests and lists each repeat's attainment, and
the sustainable rate and the token/request ratio are also given per repeat
(their spread). Unless ``bracket`` is off, the sweep is extended (halving
below, doubling above, up to ``MAX_BRACKET_STEPS``) until each discipline's
sustainable rate lies inside it, so that the ratio is defined.

The trace goes where users' requests go: through Shoal's OpenAI front door
(the Serve app on a local Ray instance) with the ``openai`` client, every
request a streamed completion. The controller places the first model on the
device and every other one joins its engine (the policy's ``join`` step);
the bench only retunes the device's discipline between sweeps and sets the
models' SLOs on the worker. The policy is told to leave the models where
they are (no hot models, no idle unloads, no consolidation): the bench
measures the device's turns, not placement.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
import time
from pathlib import Path

from cluster.bench import servers
from cluster.bench.outcomes import highest_sustained
from cluster.catalog import SLO, ModelSpec, TimeshareConfig
from cluster.testing.tiny_models import make_test_models

MODELS = [f"tiny-llama-{x}" for x in "abcdefgh"]
KV_BYTES = 64 * 2**20
AEGAEON_SLO = {"ttft_s": 10.0, "tpot_s": 0.1}
AEGAEON_STEP_S = 0.025  # decode step its SLOs were set against (7-13B on H800, approx.)
ATTAINMENT_GOAL = 0.95
DISCIPLINES = ("token", "aegaeon", "request")
# ShareGPT-like outputs (mean ~340 tokens, a long tail): a lognormal of
# this median and spread, clipped to the context the bench gives the models.
OUTPUT_MEDIAN, OUTPUT_SIGMA, OUTPUT_MAX = 250, 1.0, 1800
MAX_MODEL_LEN = 2048  # the tiny models' max_position_embeddings
STEP_BATCH = 8  # the SLO scale's basis: a decode step at this batch size
MAX_BRACKET_STEPS = 3  # halvings below / doublings above the swept rates
DEVICE = "bench-timeshare"
# Placement stays put while the bench runs: nothing is ever hot, idle or
# worth consolidating, so every model stays a member of the one engine.
STILL_POLICY = {"hot_rate": 1e9, "cold_rate": 1e9, "idle_unload_s": 1e9, "consolidate": False}


def make_trace(rate: float, n: int, seed: int, vocab: int,
               output: tuple[float, float, int] = (OUTPUT_MEDIAN, OUTPUT_SIGMA, OUTPUT_MAX),
               models: list[str] | None = None) -> list[dict]:
    """``n`` requests: Poisson arrivals at ``rate``/s, models uniform over
    ``models`` (default ``MODELS``), prompts 16-96 tokens, outputs
    ``output`` = (median, sigma, max) of a lognormal clipped to [8, max]."""
    models = models or MODELS
    median, sigma, most = output
    import numpy as np

    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.exponential(1.0 / rate)
        out.append({"at": t, "model": models[int(rng.integers(len(models)))],
                    "prompt_token_ids": [int(x) for x in
                                         rng.integers(16, vocab - 1, int(rng.integers(16, 97)))],
                    "max_tokens": int(np.clip(rng.lognormal(math.log(median), sigma), 8, most)),
                    "id": f"r{i}"})
    return out


class FrontDoor:
    """The bench's way in: the OpenAI endpoint, and the device's worker for
    its knobs (discipline, SLOs) and its scheduler's totals."""

    def __init__(self, url: str, worker):
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                  timeout=3600)
        self.worker = worker

    async def totals(self):
        (group,) = (await self.worker.stats.remote()).groups.values()
        return group


async def _one(door: FrontDoor, req: dict, t0: float) -> dict:
    """One streamed completion: TTFT to the first token, TPOT over the rest
    of the tokens (usage counts them: one chunk may carry several)."""
    await asyncio.sleep(max(0.0, t0 + req["at"] - time.monotonic()))
    sent = time.monotonic()
    first = last = None
    n = 0
    stream = await door.client.completions.create(
        model=req["model"], prompt=req["prompt_token_ids"], max_tokens=req["max_tokens"],
        temperature=0.0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        # Tokens arrived, whether or not they decode to text yet: the tiny
        # model's first token often makes none, and stamping the first chunk
        # with text put TTFT a relay window late and shrank TPOT to nothing.
        if chunk.choices:
            last = time.monotonic()
            first = first or last
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    if first is None or n != req["max_tokens"]:
        raise RuntimeError(f"request {req['id']}: {n} of {req['max_tokens']} tokens")
    tpot = (last - first) / (n - 1) if n > 1 else 0.0
    return {"ttft_s": first - sent, "tpot_s": tpot, "tokens": n}


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


_TOTALS = ("switches", "preemptions", "swap_s", "restart_s", "busy_s")


async def _replay(door: FrontDoor, trace: list[dict]) -> tuple[list[dict], dict, float]:
    """One replay: per-request results, the scheduler's totals over it, wall time."""
    before = await door.totals()
    t0 = time.monotonic()
    results = await asyncio.gather(*(_one(door, r, t0) for r in trace))
    wall = time.monotonic() - t0
    after = await door.totals()
    return list(results), {k: getattr(after, k) - getattr(before, k) for k in _TOTALS}, wall


def _row(results: list[dict], d: dict, wall: float, slo: SLO) -> dict:
    ok = [r["ttft_s"] <= slo.ttft_s and r["tpot_s"] <= slo.tpot_s for r in results]
    ttft, tpot = [r["ttft_s"] for r in results], [r["tpot_s"] for r in results]
    return {"slo_attainment": round(sum(ok) / len(ok), 4), "requests": len(results),
            "ttft_misses": sum(r["ttft_s"] > slo.ttft_s for r in results),
            "tpot_misses": sum(r["tpot_s"] > slo.tpot_s for r in results),
            "ttft_s_p50": _pct(ttft, 50), "ttft_s_p99": _pct(ttft, 99),
            "tpot_s_p50": _pct(tpot, 50), "tpot_s_p99": _pct(tpot, 99),
            "switches": d["switches"], "preemptions": d["preemptions"],
            "switch_fraction": round((d["swap_s"] + d["restart_s"]) / d["busy_s"], 4)
            if d["busy_s"] else 0.0,
            "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "duration_s": round(wall, 2)}


async def _measure(door: FrontDoor, rate: float, requests: int, seeds: list[int],
                   vocab: int, output: tuple[float, float, int], slo: SLO) -> dict:
    """One rate, one trace per seed (a repeat each): the row pools every
    repeat's requests; ``attainment_by_repeat`` shows the spread."""
    pooled, totals, wall, per_repeat = [], dict.fromkeys(_TOTALS, 0.0), 0.0, []
    for seed in seeds:
        results, d, w = await _replay(door, make_trace(rate, requests, seed, vocab, output))
        per_repeat.append(_row(results, d, w, slo)["slo_attainment"])
        pooled += results
        totals = {k: totals[k] + d[k] for k in _TOTALS}
        wall += w
    row = {"rate": rate, **_row(pooled, totals, wall, slo), "attainment_by_repeat": per_repeat}
    row["switches"], row["preemptions"] = int(row["switches"]), int(row["preemptions"])
    return row


def _ratio(tok: float, req: float) -> float | None:
    return round(tok / req, 3) if req else None


def _goal(token: dict, request: dict) -> dict:
    """token over request, pooled and per repeat. No ratio when request-level
    sustained no measured rate: the goal is then undecided (None), never met."""
    ratio = _ratio(token["sustainable_rate"], request["sustainable_rate"])
    by_repeat = [_ratio(t, r) for t, r in zip(token["sustainable_rate_by_repeat"],
                                               request["sustainable_rate_by_repeat"])]
    defined = [x for x in by_repeat if x is not None]
    return {"token_over_request": ratio,
            "token_over_request_by_repeat": by_repeat,
            "token_over_request_spread": [min(defined), max(defined)] if defined else None,
            "goal_token_at_least_2x_request": None if ratio is None else ratio >= 2}


def sustainable(by_rate: list[dict]) -> float:
    """Highest rate such that it and every lower swept rate meet the goal;
    0 when none does (``_goal`` reads 0 as undefined, never met)."""
    return highest_sustained(
        by_rate, lambda row: row["slo_attainment"] >= ATTAINMENT_GOAL) or 0.0


async def _one_step(door: FrontDoor, seed: int) -> float:
    req = {"at": 0.0, "model": MODELS[0], "max_tokens": 64, "id": f"step{seed}",
           "prompt_token_ids": [16 + (seed * 7 + i) % 400 for i in range(32)]}
    return (await _one(door, req, time.monotonic()))["tpot_s"]


async def _measure_step(door: FrontDoor, batch: int = STEP_BATCH, runs: int = 3) -> float:
    """Decode seconds per step of one model with ``batch`` requests at once,
    as its requests see it (the gap between their tokens): the least of the
    per-round medians over ``runs`` rounds after a warm-up. The least, since
    anything else running on this machine only ever makes a round slower,
    and a slow basis would loosen every SLO."""
    per_run = []
    for k in range(runs + 1):
        gaps = await asyncio.gather(*(_one_step(door, k * batch + i) for i in range(batch)))
        per_run.append(statistics.median(gaps))
    return min(per_run[1:])


def scaled_slo(step_s: float) -> tuple[SLO, float]:
    """Aegaeon's SLOs scaled by this machine's measured decode step: (SLO, scale)."""
    scale = step_s / AEGAEON_STEP_S
    return SLO(ttft_s=AEGAEON_SLO["ttft_s"] * scale, tpot_s=AEGAEON_SLO["tpot_s"] * scale), scale


def timeshare_settings(discipline: str, scale: float) -> TimeshareConfig:
    """The device's turn knobs under ``discipline``: the catalog defaults,
    Aegaeon's round bound scaled like its SLOs (same units)."""
    max_round_s = TimeshareConfig().max_round_s * scale
    return TimeshareConfig(discipline=discipline, max_round_s=max_round_s,
                           min_quota_s=min(TimeshareConfig().min_quota_s, max_round_s))


def _catalog(models_dir: str, names: list[str] = MODELS) -> tuple[dict, int]:
    """Same-family models (``names``), one time-sharing CPU device that holds
    one model's footprint; the footprint."""
    paths = make_test_models(models_dir, names)
    models = [{"name": m, "path": str(paths[m].resolve()), "family": "tiny-llama",
               "max_model_len": MAX_MODEL_LEN, "kv_cache_bytes": KV_BYTES} for m in names]
    footprint = ModelSpec(**models[0]).resolved().weights_bytes + KV_BYTES
    return {"models": models,
            "cpu_devices": [{"id": DEVICE, "memory_bytes": footprint + 2**20,
                             "timeshare": {"discipline": "token"}}],
            "controller": {"policy_config": STILL_POLICY}}, footprint


async def _place(door: FrontDoor, names: list[str] = MODELS) -> float:
    """One request per model, in turn: the first starts the device's engine,
    the others join it. Seconds it took."""
    t = time.monotonic()
    for i, m in enumerate(names):
        await _one(door, {"at": 0.0, "model": m, "max_tokens": 2, "id": f"place{i}",
                          "prompt_token_ids": [16 + i, 17, 18, 19]}, time.monotonic())
    return time.monotonic() - t


async def _sweep(door: FrontDoor, disc: str, rates: list[float], bracket: bool,
                 measure_rate, repeats: int) -> dict:
    """One discipline over the swept rates, bracketing its sustainable rate."""
    rows: list[dict] = []

    async def measure(rate: float) -> None:
        row = await measure_rate(rate)
        rows.append(row)
        print(f"[timeshare] {disc:7s} rate {rate:6.3f}/s: attainment "
              f"{row['slo_attainment']:.2f} by repeat {row['attainment_by_repeat']} "
              f"(TTFT misses {row['ttft_misses']}, TPOT misses {row['tpot_misses']})",
              file=sys.stderr)

    for rate in sorted(rates):
        await measure(rate)
    # Bracket the sustainable rate: halve below the sweep while even its
    # lowest rate misses the goal, double above while its highest still
    # meets it, so the ratio of the two disciplines is defined.
    while bracket and sustainable(rows) == 0 and min(r["rate"] for r in rows) / 2 >= \
            min(rates) / 2 ** MAX_BRACKET_STEPS:
        await measure(min(r["rate"] for r in rows) / 2)
    while bracket and sustainable(rows) == max(r["rate"] for r in rows) and \
            max(r["rate"] for r in rows) * 2 <= max(rates) * 2 ** MAX_BRACKET_STEPS:
        await measure(max(r["rate"] for r in rows) * 2)
    rows.sort(key=lambda r: r["rate"])
    return {"sustainable_rate": sustainable(rows),
            "sustainable_rate_by_repeat": [
                sustainable([{**r, "slo_attainment": r["attainment_by_repeat"][i]}
                             for r in rows]) for i in range(repeats)],
            "by_rate": rows}


async def _bench(url: str, worker, catalog: dict, footprint: int, rates: list[float],
                 requests: int, seed: int, plot: str | None, disciplines: tuple[str, ...],
                 output: tuple[float, float, int], repeats: int, bracket: bool) -> dict:
    seeds = [seed + 1000 * i for i in range(repeats)]
    door = FrontDoor(url, worker)
    setup_s = await _place(door)
    stats = await worker.stats.remote()
    if len(stats.shells) != 1 or len(stats.models) != len(MODELS):
        raise RuntimeError(f"expected {len(MODELS)} models in one engine, found "
                           f"{len(stats.models)} in {len(stats.shells)}")
    first = catalog["models"][0]["path"]
    vocab = json.loads((Path(first) / "config.json").read_text())["vocab_size"]
    step = await _measure_step(door)
    slo, scale = scaled_slo(step)
    for m in MODELS:
        await worker.set_slo.remote(m, slo.model_dump())
    print(f"[timeshare] measured step {step * 1e3:.2f} ms at batch {STEP_BATCH}: "
          f"SLO TTFT {slo.ttft_s:.3f} s, TPOT {slo.tpot_s * 1e3:.2f} ms", file=sys.stderr)
    # Aegaeon's round bound is in the same units as its SLOs: scale it too.
    max_round_s = TimeshareConfig().max_round_s * scale
    out: dict = {"models": len(MODELS), "path": "OpenAI front door, openai client, streamed",
                 "device_budget_bytes": catalog["cpu_devices"][0]["memory_bytes"],
                 "model_footprint_bytes": footprint, "engines": len(stats.shells),
                 "setup_s": round(setup_s, 2),
                 "slo": {"ttft_s": round(slo.ttft_s, 4), "tpot_s": round(slo.tpot_s, 4),
                         "scale": round(scale, 4), "measured_step_s": round(step, 5),
                         "max_round_s": round(max_round_s, 4),
                         "step_batch": STEP_BATCH,
                         "basis": "Aegaeon TTFT 10 s / TPOT 100 ms at a ~25 ms step"},
                 "trace": {"seeds": seeds, "requests_per_rate": requests * repeats,
                           "requests_per_repeat": requests, "rates": rates,
                           "bracketed": bracket,
                           "arrivals": "poisson", "models": "uniform",
                           "output_tokens": {"lognormal_median": output[0],
                                             "sigma": output[1], "min": 8, "max": output[2]},
                           "prompt_tokens": "16-96"}}
    for disc in disciplines:
        await worker.set_timeshare.remote(timeshare_settings(disc, scale).model_dump())
        out[disc] = await _sweep(door, disc, rates, bracket,
                                 lambda rate: _measure(door, rate, requests, seeds, vocab,
                                                       output, slo), len(seeds))
    if "token" in out and "request" in out:
        out.update(_goal(out["token"], out["request"]))
    if plot:
        out["plot"] = _plot(out, plot)
    _table(out)
    return out


def _table(out: dict) -> None:
    """A human-readable summary on stderr (stdout stays one JSON object)."""
    head = f"{'discipline':10s} {'rate':>6s} {'attain':>7s} {'TTFT p50':>9s} {'TTFT p99':>9s} " \
           f"{'TPOT p50':>9s} {'TPOT p99':>9s} {'switches':>8s} {'switch%':>8s}"
    print(head, file=sys.stderr)
    for disc in [d for d in DISCIPLINES if d in out]:
        for r in out[disc]["by_rate"]:
            print(f"{disc:10s} {r['rate']:6.2f} {r['slo_attainment']:7.2f} {r['ttft_s_p50']:9.3f} "
                  f"{r['ttft_s_p99']:9.3f} {r['tpot_s_p50']:9.4f} {r['tpot_s_p99']:9.4f} "
                  f"{r['switches']:8d} {100 * r['switch_fraction']:7.1f}%", file=sys.stderr)
    rates = ", ".join(f"{d} {out[d]['sustainable_rate']}/s" for d in DISCIPLINES if d in out)
    print(f"SLO: TTFT {out['slo']['ttft_s']} s, TPOT {out['slo']['tpot_s']} s; "
          f"sustainable rate: {rates}", file=sys.stderr)


def _plot(out: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for disc in [d for d in DISCIPLINES if d in out]:
        rows = out[disc]["by_rate"]
        ax.plot([r["rate"] for r in rows], [r["slo_attainment"] for r in rows], marker="o",
                label=f"{disc} (sustainable {out[disc]['sustainable_rate']}/s)")
    ax.axhline(ATTAINMENT_GOAL, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("total arrival rate (requests/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{out['models']} models time-sharing one device")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def device_worker(timeout_s: float = 120.0):
    """The bench device's worker actor. The app is ready before the
    controller has necessarily created it (seen once: the lookup right after
    start failed), so wait for it."""
    import ray

    from cluster.control.fleet import NAMESPACE, worker_actor_name

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(worker_actor_name(DEVICE), namespace=NAMESPACE)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_timeshare_bench(models_dir: str, rates: list[float], requests: int = 40,
                        seed: int = 0, plot: str | None = "timeshare.png",
                        repeats: int = 2, bracket: bool = True, port: int = 8013,
                        disciplines: tuple[str, ...] = ("token", "request"),
                        output: tuple[float, float, int] = (OUTPUT_MEDIAN, OUTPUT_SIGMA,
                                                            OUTPUT_MAX)) -> dict:
    unknown = set(disciplines) - set(DISCIPLINES)
    if unknown:
        raise ValueError(f"unknown discipline(s) {sorted(unknown)}; choose from {DISCIPLINES}")
    if not 8 <= output[2] <= MAX_MODEL_LEN - 100:
        raise ValueError(f"output max must be in [8, {MAX_MODEL_LEN - 100}], got {output[2]}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    catalog, footprint = _catalog(models_dir)
    with servers.ray_serve(port), servers.shoal(catalog, port) as url:
        worker = device_worker()
        return asyncio.run(_bench(url, worker, catalog, footprint, rates, requests, seed, plot,
                                  tuple(disciplines), output, repeats, bracket))
