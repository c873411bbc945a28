"""One simulation run: a system, a pool of devices, a catalog, a trace."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cluster.sim.cluster import KICK_GAP_S, TICK_S, SimCluster
from cluster.sim.profiles import DeviceProfile, load_devices
from cluster.sim.results import Results
from cluster.sim.systems import SYSTEMS, ServedModel, System
from cluster.sim.workload import Arrival

DRAIN_S = 300.0  # after the last arrival, requests get this long to finish


@dataclass(frozen=True)
class Run:
    system: str
    devices: int  # physical devices
    cost_per_hour: float
    summary: dict  # Results.summary()
    counters: dict  # events, switches, actions, failures ...
    results: Results


def expand(pool: Mapping[str, int], devices: Mapping[str, DeviceProfile] | None = None
           ) -> list[tuple[str, DeviceProfile]]:
    """{"h800": 2, "mi300x": 1} -> [("h800-0", ...), ("h800-1", ...), ("mi300x-0", ...)]."""
    devices = devices or load_devices()
    out = []
    for name in sorted(pool):
        profile = devices[name]
        out += [(f"{profile.name}-{i}", profile) for i in range(pool[name])]
    return out


def simulate(system: str | System, pool: Sequence[tuple[str, DeviceProfile]],
             models: Sequence[ServedModel], trace: Sequence[Arrival], *,
             warmup_s: float = 0.0, drain_s: float = DRAIN_S, policy=None,
             strict: bool = False, progress=None, tick_s: float = TICK_S,
             kick_gap_s: float = KICK_GAP_S) -> Run:
    """Serve ``trace`` with ``system`` on ``pool``. ``policy`` replaces the
    system's own (a test plants a buggy one); ``strict`` makes a policy
    violation raise ``SimulationError``; ``tick_s`` and ``kick_gap_s`` set
    the controller's cadence (``cluster.py``)."""
    system = SYSTEMS[system] if isinstance(system, str) else system
    sim = SimCluster(system, pool, models, policy=policy, strict=strict, tick_s=tick_s,
                     kick_gap_s=kick_gap_s)
    until = (trace[-1].time_s if trace else 0.0) + drain_s
    t0 = time.perf_counter()
    results = sim.run(trace, until, score_from_s=warmup_s, progress=progress)
    wall = time.perf_counter() - t0
    engines = [e for d in sim.devices.values() for e in d.engines] + sim.closed_engines
    totals = [e.machine.totals for e in engines]
    counters = {
        "events": sim.q.processed,
        "wall_s": round(wall, 3),
        "events_per_s": round(sim.q.processed / wall) if wall > 0 else None,
        "simulated_s": round(sim.q.now, 1),
        "switches": sum(t.switches for t in totals),
        "preemptions": sum(t.preemptions for t in totals),
        "engines_started": len(engines),
        "actions": dict(sorted(sim.actions.items())),
        "capacity_requests": sim.capacity_requests,
        "refused_actions": len(sim.failures),
        "refused_examples": sim.failures[:3],
        "policy_violations": len(sim.violations),
        "violation_examples": sim.violations[:3],
    }
    return Run(system.name, sum(p.devices for _, p in pool),
               round(sum(p.cost_per_hour for _, p in pool), 2), results.summary(), counters,
               results)
