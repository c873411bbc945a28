"""``shoal profile``: measure this machine's CPU engine for the simulator.

One real vLLM engine (CPU) on the tiny Llama, timed for what the
simulator's cost model needs (``cluster/sim/costmodel.py``, ``MeasuredCost``):

- ``fresh_engine_s``: starting the engine;
- prefill: one request of n prompt tokens until its first token, for a few
  n, fitted as ``fixed_s + per_token_s * n`` (least squares), and a
  re-prefill (prompt + generated tokens, as a resumed request) checked
  against that fit;
- decode: one step of a batch of b requests (the gap between tokens as the
  requests see it), for each b asked, the least of the per-round medians
  (anything else on the machine only slows a round down);
- ``swap_s``: the in-place swap of a same-architecture model, warm (the
  engine has served both: the prepared path), median of several.

It writes a device profile file (``cluster/sim/profiles.py``) the simulator
loads (``shoal simulate --device-profile FILE``, or the fidelity hook), and
returns the figures as JSON. Memory bandwidth and FLOP/s are measured too
(a memcpy, a matmul) so the file is a complete profile, but a measured
profile's times are what the simulator uses.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import time
from pathlib import Path

from cluster.bench.swap import measure_memcpy_gbps
from cluster.catalog import ModelSpec
from cluster.engine.checkpoint import read_checkpoint
from cluster.engine.shell import EngineShell
from cluster.engine.weight_cache import HostWeightCache
from cluster.sim.profiles import DeviceProfile, MeasuredEngine, device_file_json
from cluster.testing.tiny_models import make_test_models

PAIR = ("tiny-llama-a", "tiny-llama-b")
PREFILL_TOKENS = (16, 64, 256, 768)
REPREFILL = (200, 100)  # a resumed request: 200 prompt + 100 generated tokens
MAX_MODEL_LEN = 2048
KV_BYTES = 256 * 2**20
DECODE_TOKENS = 48
ROUNDS = 3


def _params(max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA)


def _prompt(n: int, seed: int) -> list[int]:
    return [16 + (seed * 31 + i * 7) % 400 for i in range(n)]


async def _first_token_s(shell: EngineShell, n: int, rid: str) -> float:
    t = time.perf_counter()
    async for _ in shell.generate(_prompt(n, sum(map(ord, rid)) % 97), _params(1), rid):
        return time.perf_counter() - t
    raise RuntimeError("no output")


async def _gaps(shell: EngineShell, rid: str, seed: int) -> float:
    """Median gap between this request's tokens after the first."""
    times = []
    async for out in shell.generate(_prompt(32, seed), _params(DECODE_TOKENS), rid):
        if out.outputs[0].token_ids:
            times += [time.perf_counter()] * len(out.outputs[0].token_ids)
    gaps = [b - a for a, b in zip(times[1:], times[2:]) if b > a] or [0.0]
    return statistics.median(gaps)


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line through (xs, ys): (intercept, slope), intercept >= 0."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return max(0.0, my - slope * mx), max(0.0, slope)


def _matmul_flops() -> float:
    import torch

    a = torch.randn(1024, 1024)
    a @ a
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    return 10 * 2 * 1024**3 / (time.perf_counter() - t)


async def _measure(models_dir: str, batches: tuple[int, ...]) -> dict:
    paths = make_test_models(models_dir, list(PAIR))
    specs = [ModelSpec(name=n, path=str(paths[n]), family="tiny-llama",
                       max_model_len=MAX_MODEL_LEN, kv_cache_bytes=KV_BYTES).resolved()
             for n in PAIR]
    cache = HostWeightCache(owner="profile")
    try:
        cached = [cache.put(s.name, s.path) for s in specs]
        t = time.perf_counter()
        shell = await EngineShell.start("profile", specs[0], read_checkpoint(specs[0].path),
                                        sleep_mode=False, eager=True)
        fresh_s = time.perf_counter() - t
        try:
            await _first_token_s(shell, 16, "warm-up")
            prefill = {n: min([await _first_token_s(shell, n, f"p{n}-{k}")
                               for k in range(ROUNDS)]) for n in PREFILL_TOKENS}
            fixed, per_token = _fit(list(prefill), list(prefill.values()))
            reprefill = min([await _first_token_s(shell, sum(REPREFILL), f"re-{k}")
                             for k in range(ROUNDS)])
            steps = {}
            for b in batches:
                rounds = [statistics.median(await asyncio.gather(
                    *(_gaps(shell, f"d{b}-{r}-{i}", r * b + i) for i in range(b))))
                    for r in range(ROUNDS + 1)]
                steps[b] = min(rounds[1:])
            swaps = []
            for i in range(2 * ROUNDS + 2):  # the first visit of each is a reload
                j = (i + 1) % 2
                swaps.append((await shell.swap_in(PAIR[j], str(cached[j].dir)),
                              shell.last_swap_path))
            warm = [s for s, path in swaps[2:]] or [s for s, _ in swaps]
        finally:
            shell.shutdown()
    finally:
        cache.close()
    return {"weights_bytes": specs[0].weights_bytes, "fresh_engine_s": fresh_s,
            "prefill_s_by_tokens": prefill, "prefill_fixed_s": fixed,
            "prefill_per_token_s": per_token,
            "reprefill": {"prompt_tokens": REPREFILL[0], "generated_tokens": REPREFILL[1],
                          "measured_s": reprefill,
                          "fit_s": fixed + per_token * sum(REPREFILL)},
            "decode_step_s_by_batch": steps, "swap_s": statistics.median(warm),
            "swap_paths": [p for _, p in swaps]}


def run_profile(models_dir: str, out: str, batches: tuple[int, ...] = (1, 2, 4, 8, 16)) -> dict:
    m = asyncio.run(_measure(models_dir, tuple(sorted(set(batches)))))
    memcpy = measure_memcpy_gbps(m["weights_bytes"]) * 1e9
    host = platform.node() or "cpu"
    measured = MeasuredEngine(
        model=PAIR[0], weights_bytes=m["weights_bytes"], prefill_fixed_s=m["prefill_fixed_s"],
        prefill_per_token_s=m["prefill_per_token_s"],
        decode_step_s_by_batch={int(b): s for b, s in m["decode_step_s_by_batch"].items()},
        swap_s=m["swap_s"], fresh_engine_s=m["fresh_engine_s"],
        notes={"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
               "prefill_s_by_tokens": {str(k): v for k, v in m["prefill_s_by_tokens"].items()},
               "reprefill": m["reprefill"], "swap_paths": m["swap_paths"]})
    device = DeviceProfile(
        name=f"cpu-{host}", vendor="cpu", accelerator_type=None,
        memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        memory_bandwidth_bytes_per_s=memcpy, dense_flops_per_s=_matmul_flops(),
        host_link_bytes_per_s=memcpy, cost_per_hour=0.0,
        sources={"measured": f"shoal profile on {host}: tiny-llama on vLLM (CPU)",
                 "memory_bandwidth_bytes_per_s": "a host memcpy of the model's size",
                 "dense_flops_per_s": "a 1024x1024 fp32 matmul (torch)",
                 "cost_per_hour": "a CPU already paid for: 0"},
        measured=measured)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(device_file_json(device, "measured by `shoal profile`; load with "
                                             "cluster.sim.profiles.load_device_file"))
    return {"profile": str(path), "device": device.name, **{k: v for k, v in m.items()
                                                            if k != "swap_paths"},
            "swap_paths": m["swap_paths"], "memcpy_gbps": round(memcpy / 1e9, 2)}
