"""The hook for the fidelity run: one device, N models time-shared on it.

``shoal simulate --fidelity`` (to come) replays one CSV trace on the live
cluster (one CPU device time-sharing N tiny models) and through
``simulate_timeshared`` on the device profile ``shoal profile`` measured
there, and compares per-request TTFT and TPOT and the attainment (goal: the
simulator within 15%). No placement policy runs here: the N models are
members of one time-shared engine from the start, as on the live device
once every model has been loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cluster.sim.cluster import SimCluster
from cluster.sim.engine import SimEngine
from cluster.sim.profiles import DeviceProfile, ModelProfile, load_device_file
from cluster.sim.results import RequestOutcome
from cluster.sim.systems import GPU_TURNS, System, ServedModel
from cluster.sim.costmodel import Switch
from cluster.sim.workload import Arrival, read_csv
from cluster.sim import worker
from policies.turns import TurnConfig


@dataclass(frozen=True)
class FidelityResult:
    outcomes: tuple[RequestOutcome, ...]  # per request, in trace order
    summary: dict  # Results.summary(): attainment, TTFT/TPOT percentiles
    switches: int
    preemptions: int


def simulate_timeshared(trace: str | Path | Sequence[Arrival], device: DeviceProfile | str | Path,
                        models: Sequence[ModelProfile], ttft_slo_s: float, tpot_slo_s: float,
                        turns: TurnConfig = GPU_TURNS, kv_cache_bytes: int | None = None,
                        drain_s: float = 300.0) -> FidelityResult:
    """Serve ``trace`` (a CSV path or arrivals) with ``models`` all time-shared
    on one engine on ``device`` (a profile, or a profile file), the first
    model's weights resident at the start, every request scored."""
    if not isinstance(device, DeviceProfile):
        device = load_device_file(device)
    arrivals = read_csv(trace) if isinstance(trace, (str, Path)) else tuple(trace)
    sim, engine = timeshared_device(device, models, ttft_slo_s, tpot_slo_s, turns,
                                    kv_cache_bytes)
    results = sim.run(arrivals, (arrivals[-1].time_s if arrivals else 0.0) + drain_s,
                      place=False)
    totals = engine.machine.totals
    return FidelityResult(tuple(results.outcomes()), results.summary(), totals.switches,
                          totals.preemptions)


def timeshared_device(device: DeviceProfile, models: Sequence[ModelProfile], ttft_slo_s: float,
                      tpot_slo_s: float, turns: TurnConfig = GPU_TURNS,
                      kv_cache_bytes: int | None = None) -> tuple[SimCluster, SimEngine]:
    """A one-device cluster whose one engine time-shares ``models`` (the first
    one's weights resident), no policy: the engine to drive."""
    families = {m.family for m in models}
    if len(families) != 1:
        raise ValueError(f"time-shared models must be of one family, got {sorted(families)}")
    served = [ServedModel(m, ttft_slo_s, tpot_slo_s) for m in models]
    system = System("timeshared-device", None, turns, Switch.IN_PLACE, whole_device_kv=True)
    sim = SimCluster(system, [(device.name, device)], served)
    if kv_cache_bytes is not None:
        sim.kv_bytes = {m.name: kv_cache_bytes for m in served}
    engine = sim.make_engine(sim.devices[device.name], served[0].name, ready_at=0.0)
    for m in served:
        worker.join(sim, engine, m.name)
    engine.resident = served[0].name
    return sim, engine


def aliases(model: ModelProfile, n: int) -> list[ModelProfile]:
    """n same-architecture models named like the live bench's (``<name>-<i>``)."""
    return [replace(model, name=f"{model.name}-{i}") for i in range(n)]
