"""The live half of ``shoal simulate --fidelity``: one trace on a real device.

N same-family tiny models time-share one CPU device (``token`` turns) on a
local Ray instance, served through Shoal's OpenAI front door, exactly as
``shoal bench timeshare`` serves them: its catalog, its placement (the first
model starts the engine, the others join it), its replay client, its SLOs
(Aegaeon's scaled by the decode step measured here) and its turn settings.
What this adds is only the shape of one fidelity run: one seeded trace,
saved as the simulator's CSV, replayed once, every request's TTFT and TPOT
kept in trace order (a failed request is kept as missing, not dropped), and
what the simulator needs to replay the same run: the SLOs, the turn config
the device used (``TurnConfig``, the machine both drivers run) and the
served model's shapes (``ModelProfile``, for its KV cache).

The comparison itself is pure arithmetic and lives with the simulator
(``cluster/sim/fidelity.py``); ``cluster/ops/fidelity.py`` composes the two.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.bench import servers, timeshare
from cluster.catalog import SLO
from cluster.sim.fidelity import Latency
from cluster.sim.profiles import ModelProfile
from cluster.sim.workload import Arrival, write_csv
from policies.turns import TurnConfig

# Light enough that the live run ends within a few minutes on two cores:
# 40 requests at 0.5/s over 4 models (~80 s of arrivals), short outputs.
RATE = 0.5
OUTPUT = (64.0, 0.8, 400)  # lognormal median, sigma, cap of output tokens
MIN_MODELS = 4
# The serving path as requests see it, measured on the idle device before
# the replay: single requests of this prompt length for the path latency,
# and the decode step at these batch sizes (``timeshare._measure_step``).
PATH_PROMPT_TOKENS, PATH_SAMPLES = 32, 8
SERVED_STEP_BATCHES = (1, 8)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class LiveRun:
    """One replay on the live device, and what the simulator needs to redo it."""

    latencies: tuple[Latency | None, ...]  # per request, trace order; None: it failed
    slo: SLO  # both runs score against it
    measured_step_s: float  # the SLO scale's basis (``timeshare._measure_step``)
    turns: TurnConfig  # the device's turn settings in force during the replay
    # Through the front door on the idle device, before the replay: the
    # median TTFT of single requests of PATH_PROMPT_TOKENS (engine prefill
    # plus the path: HTTP, Serve, router, worker, relay), and the decode step
    # per batch size as the requests' token gaps show it.
    idle_ttft_s: float
    served_step_s_by_batch: dict[int, float]
    model: ModelProfile  # the served models' shapes (all are aliases of it)
    kv_cache_bytes: int  # the time-shared engine's KV cache
    summary: dict  # the bench's row: attainment, percentiles, switches, wall time
    errors: tuple[str, ...]  # why each failed request failed


def model_names(n: int) -> list[str]:
    if not MIN_MODELS <= n <= len(timeshare.MODELS):
        raise ValueError(f"--models must be in [{MIN_MODELS}, {len(timeshare.MODELS)}], got {n}")
    return timeshare.MODELS[:n]


def make_fidelity_trace(models_dir: str, names: list[str], requests: int, seed: int,
                        rate: float = RATE) -> list[dict]:
    """``bench timeshare``'s trace generator over ``names``."""
    paths = timeshare.make_test_models(models_dir, names)
    vocab = json.loads((paths[names[0]] / "config.json").read_text())["vocab_size"]
    return timeshare.make_trace(rate, requests, seed, vocab, OUTPUT, models=names)


def write_trace(trace: list[dict], path: str | Path) -> Path:
    """The trace as the simulator's CSV (``time,model,input_tokens,output_tokens``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv([Arrival(r["at"], r["model"], len(r["prompt_token_ids"]), r["max_tokens"])
               for r in trace], path)
    return path


def model_profile(models_dir: str, name: str) -> ModelProfile:
    """The tiny checkpoint's shapes, read from its config.json."""
    path = Path(models_dir) / name
    cfg = json.loads((path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dtype = _DTYPE_BYTES.get(str(cfg.get("torch_dtype", "float32")), 4)
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return ModelProfile(
        name=name, family="tiny-llama", params=weights / dtype, weights_bytes=weights,
        layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        # K and V, every layer, every KV head.
        kv_bytes_per_token=2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"]
        * head_dim * dtype,
        sources={"shapes": f"{path}/config.json", "weights_bytes": "its safetensors files"})


async def _one_kept(door, req: dict, t0: float) -> tuple[Latency | None, str | None]:
    try:
        r = await timeshare._one(door, req, t0)
    except Exception as e:  # kept as a missing request: the comparison says so
        return None, f"{req['id']}: {type(e).__name__}: {e}"
    return Latency(r["ttft_s"], r["tpot_s"] if r["tokens"] > 1 else None, False), None


async def _idle_ttft(door, model: str) -> float:
    """Median TTFT of single requests, one at a time, to the resident model."""
    out = []
    for i in range(PATH_SAMPLES):
        req = {"at": 0.0, "model": model, "max_tokens": 2, "id": f"path{i}",
               "prompt_token_ids": [16 + (i * 13 + k) % 400 for k in range(PATH_PROMPT_TOKENS)]}
        out.append((await timeshare._one(door, req, time.monotonic()))["ttft_s"])
    return statistics.median(out)


async def _run(url: str, worker, names: list[str], trace: list[dict],
               model: ModelProfile) -> LiveRun:
    from cluster.engine.timeshare import turn_config

    door = timeshare.FrontDoor(url, worker)
    await timeshare._place(door, names)
    stats = await worker.stats.remote()
    if len(stats.shells) != 1 or len(stats.models) != len(names):
        raise RuntimeError(f"expected {len(names)} models in one engine, found "
                           f"{len(stats.models)} in {len(stats.shells)}")
    served = {b: await timeshare._measure_step(door, batch=b) for b in SERVED_STEP_BATCHES}
    step = served[timeshare.STEP_BATCH]
    idle_ttft = await _idle_ttft(door, names[0])
    slo, scale = timeshare.scaled_slo(step)
    for m in names:
        await worker.set_slo.remote(m, slo.model_dump())
    settings = await worker.set_timeshare.remote(
        timeshare.timeshare_settings("token", scale).model_dump())
    turns = turn_config(timeshare.TimeshareConfig.model_validate(settings))
    print(f"[fidelity] step {step * 1e3:.2f} ms: SLO TTFT {slo.ttft_s:.3f} s, TPOT "
          f"{slo.tpot_s * 1e3:.2f} ms; replaying {len(trace)} requests", file=sys.stderr)
    before = await door.totals()
    t0 = time.monotonic()
    kept = await asyncio.gather(*(_one_kept(door, r, t0) for r in trace))
    wall = time.monotonic() - t0
    after = await door.totals()
    deltas = {k: getattr(after, k) - getattr(before, k) for k in timeshare._TOTALS}
    lat = [None if x is None else Latency(x.ttft_s, x.tpot_s, x.ttft_s <= slo.ttft_s and
                                          (x.tpot_s or 0.0) <= slo.tpot_s) for x, _ in kept]
    done = [{"ttft_s": x.ttft_s, "tpot_s": x.tpot_s or 0.0, "tokens": r["max_tokens"]}
            for (x, _), r in zip(kept, trace) if x is not None]
    summary = timeshare._row(done, deltas, wall, slo) if done else {"requests": 0}
    summary["switches"], summary["preemptions"] = int(deltas["switches"]), \
        int(deltas["preemptions"])
    return LiveRun(tuple(lat), slo, step, turns, idle_ttft, served, model, timeshare.KV_BYTES,
                   summary, tuple(e for _, e in kept if e))


def run_live(models_dir: str, names: list[str], trace: list[dict], port: int = 8014) -> LiveRun:
    """Start the app (``bench timeshare``'s catalog over ``names``), replay ``trace``."""
    catalog, _ = timeshare._catalog(models_dir, names)
    model = model_profile(models_dir, names[0])
    with servers.ray_serve(port), servers.shoal(catalog, port) as url:
        worker = timeshare.device_worker()
        return asyncio.run(_run(url, worker, names, trace, model))
