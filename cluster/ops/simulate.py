"""``shoal simulate``: the simulator's scenarios from the command line.

Stdout gets one JSON object; a Markdown table and a progress bar go to
stderr, plots to ``--plots``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from cluster.sim import report, scenarios
from cluster.sim.profiles import alias, load_device_file, load_devices, load_models
from cluster.sim.run import simulate
from cluster.sim.systems import ServedModel
from cluster.sim.workload import read_csv


def run_simulate(args) -> dict:
    bar = None if args.no_progress else tqdm(file=sys.stderr, unit="run", dynamic_ncols=True)
    try:
        if getattr(args, "fidelity", False):
            from cluster.ops.fidelity import run_fidelity

            out = run_fidelity(args)
        elif args.scenario == "aegaeon":
            out = scenarios.aegaeon(args.duration_s or 600.0, args.seed, systems=args.systems,
                                    progress=_step(bar))
            if args.plots:
                out["plots"] = report.aegaeon_plots(out, args.plots)
            print(report.aegaeon_table(out), file=sys.stderr)
        elif args.scenario == "mixed-pool":
            out = scenarios.mixed_pool(args.duration_s or 600.0, args.seed, progress=_step(bar))
            print(report.mixed_table(out), file=sys.stderr)
        elif args.trace:
            out = _trace(args)
        else:
            duration = args.duration_s or 3600.0
            if bar is not None:
                bar.reset(total=round(duration))
                bar.unit = "simulated s"
            out = scenarios.scale(args.models or 1000, duration, args.seed, args.total_rate,
                                  args.alpha, args.devices, progress=_clock(bar))
    finally:
        if bar is not None:
            bar.close()
    return out


def _step(bar):
    def step(message: str) -> None:
        if bar is not None:
            bar.set_description(message[:70])
            bar.update(1)
    return step


def _clock(bar):
    def tick(now: float) -> None:
        if bar is not None:
            bar.n = min(round(now), bar.total or round(now))
            bar.refresh()
    return tick


def _trace(args) -> dict:
    """A CSV trace on ``--devices`` of one profile, every model an alias of ``--base-model``."""
    devices = load_devices()
    profile = devices.get(args.device_profile) or load_device_file(Path(args.device_profile))
    trace = read_csv(args.trace)
    base = load_models()[args.base_model]
    served = [ServedModel(alias(base, m)) for m in sorted({a.model for a in trace})]
    n = args.devices or 1
    pool = [(f"{profile.name}-{i}", profile) for i in range(n)]
    r = simulate(args.system, pool, served, trace)
    return {"system": r.system, "devices": r.devices, "cost_per_hour": r.cost_per_hour,
            "summary": r.summary, "counters": r.counters}
