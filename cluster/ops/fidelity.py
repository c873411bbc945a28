"""``shoal simulate --fidelity``: the simulator against the live device.

One seeded trace (``bench timeshare``'s generator over ``--models`` tiny
models), saved under ``bench-results/fidelity/``, is served twice with the
same SLOs and the same turn config: live (``cluster/bench/fidelity.py``,
through the OpenAI front door, ``token`` turns) and simulated
(``cluster/sim/fidelity.py``'s ``simulate_timeshared`` on the measured
device profile). ``compare`` there defines the three errors.

The profile is ``--profile`` if given; otherwise ``.shoal/profiles/cpu.json``
if it exists (reused: the JSON says so, and when it was measured), else
``shoal profile`` measures it now, before the live run (never during it:
both would share the two cores).

The simulated run is charged the serving path the engine's profile cannot
see, measured live on the idle device before the replay, never fitted to
the replay: the path latency (an idle request's TTFT through the front door
less the profile's prefill of its prompt) and the decode step as requests
see it through the front door (``sim.fidelity.served_profile``). The
engine's profile alone is compared too (``engine_profile_alone``).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from cluster.bench import fidelity as live_half
from cluster.sim import fidelity as sim_half
from cluster.sim.profiles import alias, load_device_file

DEFAULT_PROFILE = Path(".shoal/profiles/cpu.json")
OUT_DIR = Path("bench-results/fidelity")


def _profile(args) -> tuple[Path, str]:
    if args.profile:
        return Path(args.profile), "given (--profile)"
    if DEFAULT_PROFILE.exists():
        return DEFAULT_PROFILE, "reused (already present; not measured by this run)"
    from cluster.bench.profile import run_profile

    print(f"[fidelity] no {DEFAULT_PROFILE}: measuring it (shoal profile)", file=sys.stderr)
    run_profile(args.models_dir, str(DEFAULT_PROFILE))
    return DEFAULT_PROFILE, "measured by this run (shoal profile)"


def run_fidelity(args) -> dict:
    names = live_half.model_names(args.models or live_half.MIN_MODELS)
    requests = args.requests
    trace = live_half.make_fidelity_trace(args.models_dir, names, requests, args.seed)
    trace_path = live_half.write_trace(
        trace, OUT_DIR / f"trace-{len(names)}m-{requests}r-seed{args.seed}.csv")
    profile_path, profile_source = _profile(args)
    device = load_device_file(profile_path)
    live = live_half.run_live(args.models_dir, names, trace)
    models = [alias(live.model, n) for n in names]

    def simulated(profile, path_s: float):
        # The live turn machine has measured the step before the replay (the
        # placement, the step and path measurements ran on it); a fresh
        # simulated one has not, and with a TPOT SLO under ~23 ms its 20 ms
        # default_step_s admits nothing (README "Simulator", the admission
        # rule). It starts from the profile's step at batch 1 instead.
        step = min(profile.measured.decode_step_s_by_batch.items())[1]
        turns = replace(live.turns, default_step_s=step)
        return sim_half.simulate_timeshared(
            trace_path, profile, models, live.slo.ttft_s, live.slo.tpot_s, turns=turns,
            kv_cache_bytes=live.kv_cache_bytes, path_s=path_s)

    # The headline: the engine's profile plus the serving path as measured
    # live before the replay (module docstring); the engine's profile alone
    # is kept beside it, to show what the path is worth.
    served = sim_half.served_profile(device, live.served_step_s_by_batch)
    path_s = sim_half.path_latency_s(device, live.idle_ttft_s, live_half.PATH_PROMPT_TOKENS)
    sim = simulated(served, path_s)
    engine_only = simulated(device, 0.0)
    out = sim_half.compare(live.latencies, sim_half.latencies(sim))
    alone = sim_half.compare(live.latencies, sim_half.latencies(engine_only))
    measured_at = device.measured.notes.get("measured_at") if device.measured else None
    return {
        "ttft_rel_error": out.pop("ttft_rel_error"),
        "tpot_rel_error": out.pop("tpot_rel_error"),
        "attainment_rel_error": out.pop("attainment_rel_error"),
        "goal_met": out.pop("goal_met"),
        **out,
        "trace": {"path": str(trace_path), "models": names, "requests": requests,
                  "seed": args.seed, "rate": live_half.RATE,
                  "output_tokens": dict(zip(("lognormal_median", "sigma", "max"),
                                            live_half.OUTPUT))},
        "profile": {"path": str(profile_path), "source": profile_source,
                    "measured_at": measured_at, "device": device.name},
        "slo": {"ttft_s": round(live.slo.ttft_s, 4), "tpot_s": round(live.slo.tpot_s, 5),
                "measured_step_s": round(live.measured_step_s, 5),
                "basis": "bench timeshare: Aegaeon's SLOs scaled by the step"},
        "turns": {"discipline": live.turns.discipline, "min_quota_s": live.turns.min_quota_s,
                  "max_round_s": round(live.turns.max_round_s, 4),
                  "default_step_s": live.turns.default_step_s},
        "serving_path": {
            "idle_ttft_s": round(live.idle_ttft_s, 5),
            "prompt_tokens": live_half.PATH_PROMPT_TOKENS,
            "path_s": round(path_s, 5),
            "step_s_by_batch_front_door": {b: round(v, 5) for b, v in
                                           live.served_step_s_by_batch.items()},
            "step_s_by_batch_engine": {b: round(v, 5) for b, v in
                                       device.measured.decode_step_s_by_batch.items()}},
        "live": {**live.summary, "failed": list(live.errors)},
        "sim": {**sim.summary, "switches": sim.switches, "preemptions": sim.preemptions},
        "engine_profile_alone": {
            **{k: alone[k] for k in ("ttft_rel_error", "tpot_rel_error",
                                     "attainment_rel_error", "goal_met", "ttft_mean_s",
                                     "tpot_mean_s", "attainment")},
            "sim": {**engine_only.summary, "switches": engine_only.switches,
                    "preemptions": engine_only.preemptions}},
    }
