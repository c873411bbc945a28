"""The ``shoal`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys


def _make_test_models(args) -> int:
    from cluster.testing.tiny_models import make_test_models

    for name, path in make_test_models(args.dir, args.only or None).items():
        print(f"{name}\t{path}")
    return 0


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything written to fd 1 (vLLM's logs, its engine processes'
    too) to stderr, so a benchmark's stdout is its JSON alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _bench(args) -> int:
    with _stdout_to_stderr():
        result = _run_bench(args)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _run_bench(args) -> dict:
    if args.what == "swap":
        from cluster.bench.swap import run_swap_bench

        result = run_swap_bench(args.models_dir, swaps=args.swaps)
    elif args.what == "overhead":
        from cluster.bench.overhead import run_overhead_bench

        result = run_overhead_bench(args.models_dir, requests=args.requests,
                                    worker_niceness=args.worker_niceness)
    elif args.what == "timeshare":
        from cluster.bench.timeshare import run_timeshare_bench

        result = run_timeshare_bench(args.models_dir, rates=args.rates,
                                     requests=args.trace_requests, seed=args.seed,
                                     plot=args.plot or None, disciplines=args.disciplines,
                                     output=(args.output_median, args.output_sigma,
                                             args.output_max),
                                     repeats=args.repeats, bracket=not args.no_bracket)
    elif args.what == "serve":
        from cluster.bench.serve import run_serve_bench

        result = run_serve_bench(args.models_dir, concurrencies=tuple(args.concurrency),
                                 prompts=args.prompts, repeats=args.repeats,
                                 plot=args.serve_plot or None, which=tuple(args.servers),
                                 worker_niceness=args.worker_niceness)
    elif args.what == "elastic":
        from cluster.bench.elastic import run_elastic_bench

        result = run_elastic_bench(args.models_dir)
    elif args.what == "load":
        from cluster.bench.load import run_load_bench

        result = run_load_bench(args.models_dir, rates=args.load_rates, factor=args.factor,
                                max_rates=args.max_rates, duration_s=args.duration_s,
                                n_models=args.models, seed=args.seed)
    elif args.what == "chaos":
        from cluster.bench.chaos import run_chaos_bench

        result = run_chaos_bench(args.models_dir, faults_to_run=args.faults)
    else:  # argparse restricts choices
        raise AssertionError(args.what)
    return result


def _simulate(args) -> int:
    from cluster.ops.simulate import run_simulate

    # The fidelity run starts Ray and vLLM, whose logs would reach stdout.
    with _stdout_to_stderr() if args.fidelity else contextlib.nullcontext():
        result = run_simulate(args)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _profile(args) -> int:
    with _stdout_to_stderr():
        from cluster.bench.profile import run_profile

        result = run_profile(args.models_dir, args.out, batches=tuple(args.batches))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _demo(args) -> int:
    from cluster.ops.demo import run_demo

    run_demo(args.url)
    return 0


def _up(args) -> int:
    from cluster.ops.lifecycle import up

    url = up(args.config, args.port, args.demo, host=args.host)
    print(f"Shoal is up: {url}/v1 (OpenAI API), {url}/admin/status, {url}/metrics")
    print("stop it with: shoal down")
    return 0


def _down(args) -> int:
    from cluster.ops.lifecycle import down

    down()
    return 0


def _status(args) -> int:
    from cluster.ops.lifecycle import status
    from cluster.ops.status_table import status_table

    st = status()
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(status_table(st, name=args.model, state=args.state, device=args.device,
                           show_models=not args.devices_only))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shoal", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make-test-models", help="write the tiny local HF checkpoints")
    m.add_argument("dir")
    m.add_argument("--only", nargs="*", help="model names (default: all)")
    m.set_defaults(fn=_make_test_models)

    b = sub.add_parser("bench", help="benchmarks that print one JSON object")
    b.add_argument("what", choices=["swap", "overhead", "timeshare", "serve", "elastic",
                                        "load", "chaos"])
    b.add_argument("--json", action="store_true", help="one line of JSON")
    b.add_argument("--models-dir", default=".shoal/models")
    b.add_argument("--swaps", type=int, default=10, help="swap: swaps to time")
    b.add_argument("--requests", type=int, default=30, help="overhead: requests per path")
    b.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1, 1.5, 2],
                   help="timeshare: total arrival rates to sweep (requests/s)")
    b.add_argument("--disciplines", nargs="+", default=["token", "request"],
                   help="timeshare: token, aegaeon and/or request")
    b.add_argument("--trace-requests", type=int, default=40,
                   help="timeshare: requests per rate")
    b.add_argument("--seed", type=int, default=0, help="timeshare: trace seed")
    b.add_argument("--output-median", type=float, default=250,
                   help="timeshare: median output tokens (lognormal)")
    b.add_argument("--output-sigma", type=float, default=1.0,
                   help="timeshare: spread of the lognormal output lengths")
    b.add_argument("--output-max", type=int, default=1800, help="timeshare: output cap")
    b.add_argument("--plot", default="bench-results/timeshare.png",
                   help="timeshare: where to save the attainment plot ('' = none)")
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                   help="serve: client concurrencies to sweep")
    b.add_argument("--prompts", type=int, default=64, help="serve: prompts per run")
    b.add_argument("--repeats", type=int, default=2,
                   help="serve: runs per concurrency; timeshare: traces (seeds) per rate")
    b.add_argument("--no-bracket", action="store_true",
                   help="timeshare: only the swept rates (no halving/doubling to bracket "
                        "each discipline's sustainable rate)")
    b.add_argument("--servers", nargs="+", default=["vllm", "rayserve_llm", "shoal"],
                   choices=["vllm", "rayserve_llm", "shoal"], help="serve: which servers")
    b.add_argument("--serve-plot", default="bench-results/serve.png",
                   help="serve: where to save the throughput plot ('' = none)")
    b.add_argument("--worker-niceness", type=int, default=0,
                   help="serve, overhead: nice level of the Ray workers (Ray's default is 15; "
                        "0 puts the Ray-based servers on the footing of vLLM's own server "
                        "and the client: cluster/bench/servers.py)")
    b.add_argument("--load-rates", type=float, nargs="+", default=None,
                   help="load: the first rates (req/s; default 1); then stepped by --factor")
    b.add_argument("--factor", type=float, default=2.0, help="load: rate step factor")
    b.add_argument("--max-rates", type=int, default=7, help="load: most rates measured")
    b.add_argument("--duration-s", type=float, default=20.0,
                   help="load: seconds of arrivals per rate")
    b.add_argument("--models", type=int, default=8, help="load: catalog models (8)")
    b.add_argument("--faults", nargs="+", default=None,
                   help="chaos: fault kinds (default all): kill_worker sigkill_engine_core "
                        "kill_controller kill_ingress remove_node")
    b.set_defaults(fn=_bench)

    sim = sub.add_parser("simulate", help="the discrete-event simulator (cluster/sim/); prints JSON")
    sim.add_argument("--scenario", choices=["aegaeon", "mixed-pool"],
                     help="a named scenario (else: the scale run, or --trace)")
    sim.add_argument("--json", action="store_true", help="one line of JSON")
    sim.add_argument("--models", type=int, default=None,
                     help="scale run: models (1000); --fidelity: time-shared models (4)")
    sim.add_argument("--fidelity", action="store_true",
                     help="one seeded trace live (front door, time-shared CPU device) and "
                          "simulated on the measured profile; prints the relative errors")
    sim.add_argument("--requests", type=int, default=40, help="--fidelity: trace requests")
    sim.add_argument("--profile", default=None,
                     help="--fidelity: device profile file (default: .shoal/profiles/cpu.json "
                          "if present, else measured now)")
    sim.add_argument("--models-dir", default=".shoal/models", help="--fidelity: tiny models")
    sim.add_argument("--duration-s", type=float, default=None,
                     help="simulated seconds scored (scale: 3600; scenarios: 600)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--systems", nargs="+", default=["shoal", "dedicated", "serverless",
                                                       "muxserve"],
                     choices=["shoal", "dedicated", "serverless", "muxserve"])
    sim.add_argument("--devices", type=int, default=None,
                     help="scale run: H800s (default models/8); --trace: devices")
    sim.add_argument("--total-rate", type=float, default=None,
                     help="scale run: total req/s (default 0.02 per model)")
    sim.add_argument("--alpha", type=float, default=1.0,
                     help="scale run: power-law popularity exponent")
    sim.add_argument("--trace", help="CSV trace (time,model,input_tokens,output_tokens) to "
                                     "replay with --system on --devices of --device-profile")
    sim.add_argument("--system", default="shoal",
                     choices=["shoal", "dedicated", "serverless", "muxserve"])
    sim.add_argument("--device-profile", default="h800",
                     help="a device name from the shipped profiles, or a profile file "
                          "(`shoal profile` writes one)")
    sim.add_argument("--base-model", default="qwen2.5-7b",
                     help="--trace: the profile every model in the trace is an alias of")
    sim.add_argument("--plots", default="bench-results/sim",
                     help="where PNGs go ('' = none)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    sim.set_defaults(fn=_simulate)

    pr = sub.add_parser("profile", help="measure this machine's CPU engine; write a device "
                                        "profile the simulator loads")
    pr.add_argument("--json", action="store_true", help="one line of JSON")
    pr.add_argument("--models-dir", default=".shoal/models")
    pr.add_argument("--out", default=".shoal/profiles/cpu.json", help="the profile file")
    pr.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                    help="decode batch sizes to time")
    pr.set_defaults(fn=_profile)

    u = sub.add_parser("up", help="start the controller and the OpenAI front door")
    u.add_argument("--config", default="ray_configs/models.yaml", help="model catalog")
    u.add_argument("--port", type=int, default=8000)
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--demo", action="store_true",
                   help="generate the tiny models the catalog names (no hub needed)")
    u.set_defaults(fn=_up)
    sub.add_parser("down", help="stop what `shoal up` started").set_defaults(fn=_down)
    st = sub.add_parser("status", help="devices and models, as tables")
    st.add_argument("--model", help="only models whose name matches this glob, e.g. 'llama-*'")
    st.add_argument("--state", choices=["active", "loading", "parked", "cold"],
                    help="only models in this state")
    st.add_argument("--device", help="only models with a copy on this device")
    st.add_argument("--devices-only", action="store_true", help="no per-model table")
    st.add_argument("--json", action="store_true", help="the raw status as JSON")
    st.set_defaults(fn=_status)

    d = sub.add_parser("demo", help="a few openai-client requests against `shoal up`")
    d.add_argument("--url", default="http://127.0.0.1:8000")
    d.set_defaults(fn=_demo)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
