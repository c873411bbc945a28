"""The fidelity run's simulated half and its arithmetic.

``shoal simulate --fidelity`` replays one CSV trace on the live cluster (one
CPU device time-sharing N tiny models, ``cluster/bench/fidelity.py``) and
through ``simulate_timeshared`` on the device profile ``shoal profile``
measured there, with the same SLOs and the same turn config, and compares
the two with ``compare`` (goal: each error within 15%). No placement policy
runs here: the N models are members of one time-shared engine from the
start, as on the live device once every model has been loaded.

The errors (``compare``), over the requests both runs served:

- ``ttft_rel_error = |mean(sim TTFT) - mean(live TTFT)| / mean(live TTFT)``,
  the means over the requests with a TTFT in both runs;
- ``tpot_rel_error``: the same of TPOT, over the requests with a TPOT
  (two tokens or more) in both;
- ``attainment_rel_error = |sim attainment - live attainment| / live
  attainment``, each over every request of the trace (a request missing
  in a run misses there).

Why the error of the means and not a per-request error: what the simulator
is for (attainment, capacity, the devices a load needs) follows the
aggregate latency, and the aggregate is what a calibration constant moves.
Per request, the order in which turns serve requests is chaotic: a few
milliseconds of difference can flip which model goes first and swap two
requests' waits without changing any total, so a per-request error would
mostly measure that. The median of the per-request relative errors is
reported beside each figure (``*_rel_error_median_per_request``) so that
such a divergence is visible, but the goal is judged on the means. Each
error is ``None`` where the live figure is zero or there is none, and so is
its ``goal_met``: undecided, never met.
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


GOAL_REL_ERROR = 0.15


@dataclass(frozen=True)
class Latency:
    """One request as measured in one run (live, or simulated)."""

    ttft_s: float | None  # None: no token came
    tpot_s: float | None  # None: fewer than two tokens came
    met_slo: bool  # both within the SLO (a missing request misses)


def rel_error(sim: float | None, live: float | None) -> float | None:
    """|sim - live| / live; None where either is missing or live is zero."""
    if sim is None or live is None or live == 0:
        return None
    return abs(sim - live) / abs(live)


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _paired(live: Sequence[Latency | None], sim: Sequence[Latency | None], field: str) -> dict:
    pairs = [(getattr(a, field), getattr(b, field)) for a, b in zip(live, sim)
             if a is not None and b is not None and getattr(a, field) is not None
             and getattr(b, field) is not None]
    live_mean, sim_mean = _mean([a for a, _ in pairs]), _mean([b for _, b in pairs])
    per_request = [e for e in (rel_error(b, a) for a, b in pairs) if e is not None]
    return {"rel_error": rel_error(sim_mean, live_mean), "live_mean_s": live_mean,
            "sim_mean_s": sim_mean, "paired": len(pairs),
            "median_per_request": _median(per_request)}


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def compare(live: Sequence[Latency | None], sim: Sequence[Latency | None],
            goal: float = GOAL_REL_ERROR) -> dict:
    """The three errors (module docstring), their goals and the per-request
    pairs. ``live`` and ``sim`` are the same trace's requests in trace order;
    ``None`` is a request that run did not serve."""
    if len(live) != len(sim):
        raise ValueError(f"live has {len(live)} requests, sim {len(sim)}: not the same trace")
    n = len(live)
    att_live = sum(bool(x and x.met_slo) for x in live) / n if n else None
    att_sim = sum(bool(x and x.met_slo) for x in sim) / n if n else None
    ttft, tpot = _paired(live, sim, "ttft_s"), _paired(live, sim, "tpot_s")
    errors = {"ttft_rel_error": ttft["rel_error"], "tpot_rel_error": tpot["rel_error"],
              "attainment_rel_error": rel_error(att_sim, att_live)}
    out: dict = {k: _r(v) for k, v in errors.items()}
    out["goal_met"] = {k: None if v is None else v <= goal for k, v in errors.items()}
    out["goal_rel_error"] = goal
    for name, d in (("ttft", ttft), ("tpot", tpot)):
        out[f"{name}_rel_error_median_per_request"] = _r(d["median_per_request"])
        out[f"{name}_mean_s"] = {"live": _r(d["live_mean_s"], 5), "sim": _r(d["sim_mean_s"], 5),
                                 "paired_requests": d["paired"]}
    out["attainment"] = {"live": _r(att_live), "sim": _r(att_sim), "requests": n}
    out["requests"] = [
        {"index": i,
         "live": None if a is None else {"ttft_s": _r(a.ttft_s, 5), "tpot_s": _r(a.tpot_s, 5),
                                         "met_slo": a.met_slo},
         "sim": None if b is None else {"ttft_s": _r(b.ttft_s, 5), "tpot_s": _r(b.tpot_s, 5),
                                        "met_slo": b.met_slo}}
        for i, (a, b) in enumerate(zip(live, sim))]
    return out


def latencies(result: "FidelityResult") -> list[Latency | None]:
    """The simulated run's requests as ``compare`` takes them."""
    return [Latency(o.ttft_s, o.tpot_s, o.met_slo) if o.ttft_s is not None else None
            for o in result.outcomes]


@dataclass(frozen=True)
class FidelityResult:
    outcomes: tuple[RequestOutcome, ...]  # per request, in trace order
    summary: dict  # Results.summary(): attainment, TTFT/TPOT percentiles
    switches: int
    preemptions: int


def simulate_timeshared(trace: str | Path | Sequence[Arrival], device: DeviceProfile | str | Path,
                        models: Sequence[ModelProfile], ttft_slo_s: float, tpot_slo_s: float,
                        turns: TurnConfig = GPU_TURNS, kv_cache_bytes: int | None = None,
                        drain_s: float = 300.0, path_s: float = 0.0) -> FidelityResult:
    """Serve ``trace`` (a CSV path or arrivals) with ``models`` all time-shared
    on one engine on ``device`` (a profile, or a profile file), the first
    model's weights resident at the start, every request scored.

    ``path_s`` is the time a request spends outside the engine before its
    first token reaches the client (front door in, first token out; measured
    live, ``cluster/bench/fidelity.py``). The simulator has no front door, so
    each request reaches the engine ``path_s`` after it was sent and its
    TTFT counts from when it was sent: the whole path is charged on the way
    in (the two halves are not measured apart)."""
    if not isinstance(device, DeviceProfile):
        device = load_device_file(device)
    arrivals = read_csv(trace) if isinstance(trace, (str, Path)) else tuple(trace)
    sim, engine = timeshared_device(device, models, ttft_slo_s, tpot_slo_s, turns,
                                    kv_cache_bytes)
    reaching = tuple(replace(a, time_s=a.time_s + path_s) for a in arrivals)
    results = sim.run(reaching, (reaching[-1].time_s if reaching else 0.0) + drain_s,
                      place=False)
    outcomes = tuple(_sent_at(o, a.time_s, ttft_slo_s, tpot_slo_s)
                     for o, a in zip(results.outcomes(), arrivals)) if path_s else \
        tuple(results.outcomes())
    summary = results.summary()
    if path_s:
        summary["slo_attainment"] = round(sum(o.met_slo for o in outcomes) / len(outcomes), 5) \
            if outcomes else None
        summary["path_s"] = path_s  # the TTFT percentiles above are the engine's alone
    totals = engine.machine.totals
    return FidelityResult(outcomes, summary, totals.switches, totals.preemptions)


def _sent_at(o: RequestOutcome, sent_s: float, ttft_slo_s: float,
             tpot_slo_s: float) -> RequestOutcome:
    """``o`` with its TTFT counted from when the client sent it."""
    if o.ttft_s is None:
        return replace(o, arrived_s=sent_s)
    ttft = o.ttft_s + (o.arrived_s - sent_s)
    met = o.finished and ttft <= ttft_slo_s + 1e-9 and (o.tpot_s or 0.0) <= tpot_slo_s + 1e-9
    return replace(o, arrived_s=sent_s, ttft_s=ttft, met_slo=met)


def served_profile(device: DeviceProfile, step_s_by_batch: dict[int, float]) -> DeviceProfile:
    """``device``'s measured profile with the decode step as requests see it
    through the front door (``step_s_by_batch``, measured live on the idle
    device) in place of the engine's own. On a 2-core machine the front
    door's processes (Serve proxy, router, worker relaying every token) run
    beside the engine and slow each step; the engine-alone figure
    (``shoal profile``) does not see them."""
    if device.measured is None:
        raise ValueError(f"device {device.name!r} has no measured profile")
    measured = replace(device.measured, decode_step_s_by_batch=dict(step_s_by_batch),
                       notes={**device.measured.notes,
                              "engine_decode_step_s_by_batch":
                                  device.measured.decode_step_s_by_batch})
    return replace(device, name=f"{device.name}-served", measured=measured)


def path_latency_s(device: DeviceProfile, idle_ttft_s: float, prompt_tokens: int) -> float:
    """The path's share of an idle request's TTFT: the measured TTFT less
    the engine's prefill of its prompt (the profile's fit), at least 0."""
    if device.measured is None:
        raise ValueError(f"device {device.name!r} has no measured profile")
    m = device.measured
    return max(0.0, idle_ttft_s - (m.prefill_fixed_s + m.prefill_per_token_s * prompt_tokens))


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
