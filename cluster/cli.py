"""The ``shoal`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _make_test_models(args) -> int:
    from cluster.tiny_models import make_test_models

    for name, path in make_test_models(args.dir, args.only or None).items():
        print(f"{name}\t{path}")
    return 0


def _bench(args) -> int:
    if args.what == "swap":
        from cluster.bench_swap import run_swap_bench

        result = run_swap_bench(args.models_dir, swaps=args.swaps)
    elif args.what == "overhead":
        from cluster.bench_overhead import run_overhead_bench

        result = run_overhead_bench(args.models_dir, requests=args.requests)
    else:  # argparse restricts choices
        raise AssertionError(args.what)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _demo(args) -> int:
    from cluster.demo import run_demo

    run_demo(args.url)
    return 0


def _up(args) -> int:
    from cluster.lifecycle import up

    url = up(args.config, args.port, args.demo, host=args.host)
    print(f"Shoal is up: {url}/v1 (OpenAI API), {url}/admin/status, {url}/metrics")
    print("stop it with: shoal down")
    return 0


def _down(args) -> int:
    from cluster.lifecycle import down

    down()
    return 0


def _status(args) -> int:
    from cluster.lifecycle import status

    print(status())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shoal", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make-test-models", help="write the tiny local HF checkpoints")
    m.add_argument("dir")
    m.add_argument("--only", nargs="*", help="model names (default: all)")
    m.set_defaults(fn=_make_test_models)

    b = sub.add_parser("bench", help="benchmarks that print one JSON object")
    b.add_argument("what", choices=["swap", "overhead"])
    b.add_argument("--json", action="store_true", help="one line of JSON")
    b.add_argument("--models-dir", default=".shoal/models")
    b.add_argument("--swaps", type=int, default=10, help="swap: swaps to time")
    b.add_argument("--requests", type=int, default=30, help="overhead: requests per path")
    b.set_defaults(fn=_bench)

    u = sub.add_parser("up", help="start the controller and the OpenAI front door")
    u.add_argument("--config", default="ray_configs/models.yaml", help="model catalog")
    u.add_argument("--port", type=int, default=8000)
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--demo", action="store_true",
                   help="generate the tiny models the catalog names (no hub needed)")
    u.set_defaults(fn=_up)
    sub.add_parser("down", help="stop what `shoal up` started").set_defaults(fn=_down)
    sub.add_parser("status", help="devices and models, as tables").set_defaults(fn=_status)

    d = sub.add_parser("demo", help="a few openai-client requests against `shoal up`")
    d.add_argument("--url", default="http://127.0.0.1:8000")
    d.set_defaults(fn=_demo)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
