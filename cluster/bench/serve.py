"""``shoal bench serve``: OpenAI serving throughput under concurrency, three
servers in one run, measured by vLLM's own benchmark client.

vLLM's ``vllm.benchmarks.serve`` (called as a library: ``add_cli_args``,
then ``main``) drives each server in turn with the same random dataset
(64 input and 64 output tokens, ``ignore_eos``) at each concurrency:

- vLLM's own OpenAI server (the ceiling for one engine);
- Ray Serve LLM (``build_openai_app``, one replica: what users would pick);
- Shoal (its Serve app with one CPU device).

The servers run one at a time, so they never share the machine. Each
(server, concurrency) is measured ``repeats`` times; the JSON gives the
median and the spread (min, max) of every figure, and the goals at
concurrency 8 as ratios of medians. A ratio with a zero or missing
baseline is ``null`` and its goal is ``null``: undecided, never met.

Each run also reports ``server_cpu_ms_per_token``: the CPU time every
process but the client used during the run, per output token
(``cpu_time.py``). Throughput on two shared cores swings with whatever
else the machine does; the CPU a server spends per token swings far less,
and says where the difference comes from. The Ray-based servers run their
workers at nice 0, like vLLM's server and the client (``servers.py``:
``WORKER_NICENESS``; Ray's default, 15, makes them yield to the client).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from cluster.bench import servers
from cluster.bench.cpu_time import machine_cpu_s

MODEL = "tiny-llama-a"
SERVERS = ("vllm", "rayserve_llm", "shoal")
GOAL_CONCURRENCY = 8
# figure in vLLM's result -> our name
FIGURES = {"output_throughput": "output_tok_s", "mean_tpot_ms": "tpot_ms_mean",
           "median_ttft_ms": "ttft_ms_p50", "p99_ttft_ms": "ttft_ms_p99",
           "median_tpot_ms": "tpot_ms_p50", "p99_tpot_ms": "tpot_ms_p99",
           "failed": "failed", "completed": "completed"}
OUTPUT_TOKENS = 64


def _client_run(url: str, path: str, concurrency: int, prompts: int, seed: int) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", MODEL, "--tokenizer", path, "--dataset-name", "random",
        "--random-input-len", "64", "--random-output-len", str(OUTPUT_TOKENS), "--ignore-eos",
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
        "--percentile-metrics", "ttft,tpot", "--metric-percentiles", "50,99",
        "--seed", str(seed), "--disable-tqdm"])
    cpu_before = machine_cpu_s()
    result = main(args)
    cpu_after = machine_cpu_s()
    # vLLM's figures are numpy scalars: plain floats, so the JSON can hold them.
    out = {ours: None if result.get(theirs) is None else float(result[theirs])
           for theirs, ours in FIGURES.items()}
    tokens = (out.get("completed") or 0) * OUTPUT_TOKENS  # ignore_eos: every one is whole
    out["server_cpu_ms_per_token"] = (1000 * (cpu_after - cpu_before) / tokens
                                      if cpu_before is not None and tokens else None)
    return out


def _summary(runs: list[dict]) -> dict:
    out: dict = {"repeats": len(runs)}
    for key in (*FIGURES.values(), "server_cpu_ms_per_token"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            out[key] = None
            continue
        out[key] = round(statistics.median(values), 3)
        if len(values) > 1 and key not in ("failed", "completed"):
            out[f"{key}_spread"] = [round(min(values), 3), round(max(values), 3)]
    out["failed"] = sum(r.get("failed") or 0 for r in runs)  # every failure counts
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num is not None and den else None


def _goals(by_server: dict) -> dict:
    c = str(GOAL_CONCURRENCY)
    get = lambda s, k: by_server.get(s, {}).get(c, {}).get(k)  # noqa: E731
    tput_vllm = _ratio(get("shoal", "output_tok_s"), get("vllm", "output_tok_s"))
    tput_ray = _ratio(get("shoal", "output_tok_s"), get("rayserve_llm", "output_tok_s"))
    tpot_vllm = _ratio(get("shoal", "tpot_ms_mean"), get("vllm", "tpot_ms_mean"))
    failed = get("shoal", "failed")
    cpu = {f"shoal_over_{peer}_server_cpu_per_token": _ratio(
        get("shoal", "server_cpu_ms_per_token"), get(peer, "server_cpu_ms_per_token"))
        for peer in ("vllm", "rayserve_llm")}
    return {
        "concurrency": GOAL_CONCURRENCY,
        "shoal_over_vllm_tok_s": tput_vllm,
        "shoal_over_rayserve_llm_tok_s": tput_ray,
        "shoal_over_vllm_tpot": tpot_vllm,
        "tok_s_at_least_0.75x_vllm": None if tput_vllm is None else tput_vllm >= 0.75,
        "tok_s_at_least_1.5x_rayserve_llm": None if tput_ray is None else tput_ray >= 1.5,
        "tpot_at_most_1.5x_vllm": None if tpot_vllm is None else tpot_vllm <= 1.5,
        "no_failures": None if failed is None else failed == 0,
        **cpu,  # not goals: where the throughput difference comes from
    }


def run_serve_bench(models_dir: str = ".shoal/models", concurrencies=(1, 8, 32),
                    prompts: int = 64, repeats: int = 2, port: int = 8012,
                    plot: str | None = "bench-results/serve.png",
                    which: tuple[str, ...] = SERVERS,
                    worker_niceness: int = servers.WORKER_NICENESS) -> dict:
    from cluster.testing.tiny_models import make_test_models

    path = str(make_test_models(Path(models_dir), [MODEL])[MODEL].resolve())
    by_server: dict[str, dict] = {}

    def sweep(name: str, url: str) -> None:
        rows = by_server.setdefault(name, {})
        for c in concurrencies:
            _client_run(url, path, c, min(prompts, 2 * c), seed=99)  # warm-up
            runs = [_client_run(url, path, c, prompts, seed=r) for r in range(repeats)]
            rows[str(c)] = _summary(runs)
            print(f"[serve] {name:12s} c={c:3d}: {rows[str(c)]['output_tok_s']} tok/s, "
                  f"TPOT {rows[str(c)]['tpot_ms_mean']} ms, "
                  f"server CPU {rows[str(c)]['server_cpu_ms_per_token']} ms/token, "
                  f"failed {rows[str(c)]['failed']}",
                  file=sys.stderr)

    if "vllm" in which:
        with servers.vllm_server(path, MODEL, port + 1) as url:
            sweep("vllm", url)
    if {"rayserve_llm", "shoal"} & set(which):
        with servers.ray_serve(port, worker_niceness):
            if "rayserve_llm" in which:
                with servers.rayserve_llm(path, MODEL, port) as url:
                    sweep("rayserve_llm", url)
            if "shoal" in which:
                with servers.shoal(servers.one_model_catalog(path, MODEL), port) as url:
                    sweep("shoal", url)
    out = {"model": MODEL, "dataset": {"name": "random", "input_tokens": 64,
                                       "output_tokens": 64, "ignore_eos": True,
                                       "prompts": prompts},
           "client": "vllm.benchmarks.serve", "repeats": repeats,
           "ray_worker_niceness": worker_niceness,
           "servers": by_server, "goals": _goals(by_server)}
    if plot:
        out["plot"] = _plot(by_server, plot)
    return out


def _plot(by_server: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in by_server.items():
        cs = sorted(rows, key=int)
        ax.plot([int(c) for c in cs], [rows[c]["output_tok_s"] for c in cs], marker="o",
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("output tokens/s (median of repeats)")
    ax.set_title("OpenAI serving, tiny model, 64 in / 64 out")
    ax.grid(alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
