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
    else:  # argparse restricts choices
        raise AssertionError(args.what)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _demo(args) -> int:
    from cluster.demo import run_demo

    run_demo()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shoal", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make-test-models", help="write the tiny local HF checkpoints")
    m.add_argument("dir")
    m.add_argument("--only", nargs="*", help="model names (default: all)")
    m.set_defaults(fn=_make_test_models)

    b = sub.add_parser("bench", help="benchmarks that print one JSON object")
    b.add_argument("what", choices=["swap"])
    b.add_argument("--json", action="store_true", help="one line of JSON")
    b.add_argument("--models-dir", default=".shoal/models")
    b.add_argument("--swaps", type=int, default=10)
    b.set_defaults(fn=_bench)

    d = sub.add_parser("demo", help="engine-worker demo on a local Ray (make run)")
    d.set_defaults(fn=_demo)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
