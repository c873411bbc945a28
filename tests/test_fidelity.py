"""The fidelity run's arithmetic and its simulated half (``cluster/sim/fidelity.py``),
on hand-made latencies, a hand-made trace and a hand-made measured profile.
No Ray, no vLLM: the live half (``cluster/bench/fidelity.py``) is run by
``shoal simulate --fidelity`` (README "Simulator")."""

from __future__ import annotations

import pytest

from cluster.sim.fidelity import (Latency, aliases, compare, latencies, path_latency_s,
                                   served_profile, simulate_timeshared)
from cluster.sim.profiles import ModelProfile
from cluster.sim.workload import Arrival, write_csv
from policies.turns import TurnConfig
from tests.helpers import measured_device

# Prefill 10 ms + 1 ms/token, a 4 ms step at batch 1, a 20 ms swap.
DEVICE = measured_device("cpu-test", 0.01, 0.001, {1: 0.004, 8: 0.006}, swap_s=0.02)
TINY = ModelProfile(name="tiny", family="tiny", params=1e6, weights_bytes=4 * 10**6, layers=2,
                    hidden_size=128, kv_bytes_per_token=1024)
CPU_TURNS = TurnConfig(min_quota_s=0.01, max_round_s=1.0)  # the catalog's 10 ms turns


def test_the_errors_are_the_error_of_the_means_and_the_attainments():
    live = [Latency(1.0, 0.1, True), Latency(2.0, 0.2, False), None]
    sim = [Latency(1.2, 0.1, True), Latency(2.4, 0.3, True), Latency(1.0, 0.1, True)]
    out = compare(live, sim)
    # TTFT over the two requests both served: means 1.5 live, 1.8 sim.
    assert out["ttft_rel_error"] == pytest.approx(0.2)
    assert out["ttft_rel_error_median_per_request"] == pytest.approx(0.2)
    # TPOT: means 0.15 and 0.2; per request 0 and 0.5, median 0.25.
    assert out["tpot_rel_error"] == pytest.approx(1 / 3, abs=1e-4)
    assert out["tpot_rel_error_median_per_request"] == pytest.approx(0.25)
    # Attainment over all three (the missing live one misses): 1/3 live, 1 sim.
    assert out["attainment"] == {"live": pytest.approx(1 / 3, abs=1e-4), "sim": 1.0,
                                 "requests": 3}
    assert out["attainment_rel_error"] == pytest.approx(2.0)
    assert out["goal_met"] == {"ttft_rel_error": False, "tpot_rel_error": False,
                               "attainment_rel_error": False}
    assert out["requests"][2] == {"index": 2, "live": None,
                                  "sim": {"ttft_s": 1.0, "tpot_s": 0.1, "met_slo": True}}
    close = compare(live[:2], [Latency(1.1, 0.11, True), Latency(2.1, 0.2, False)])
    assert close["goal_met"] == {"ttft_rel_error": True, "tpot_rel_error": True,
                                 "attainment_rel_error": True}


def test_no_live_figure_leaves_the_goal_undecided_never_met():
    out = compare([Latency(0.5, None, False), None], [Latency(0.4, 0.1, True), None])
    assert out["tpot_rel_error"] is None  # no live TPOT at all
    assert out["attainment_rel_error"] is None  # live attainment 0
    assert out["goal_met"]["tpot_rel_error"] is None
    assert out["goal_met"]["attainment_rel_error"] is None
    assert out["ttft_rel_error"] == pytest.approx(0.2)
    assert compare([], [])["goal_met"] == dict.fromkeys(
        ("ttft_rel_error", "tpot_rel_error", "attainment_rel_error"))
    with pytest.raises(ValueError, match="not the same trace"):
        compare([None], [])


def _run(trace, tmp_path, name="t.csv"):
    path = tmp_path / name
    write_csv(trace, path)
    return simulate_timeshared(path, DEVICE, aliases(TINY, 2), ttft_slo_s=1.0, tpot_slo_s=0.1,
                               turns=CPU_TURNS, kv_cache_bytes=2**20)


def test_the_simulated_half_by_hand(tmp_path):
    m0, m1 = (m.name for m in aliases(TINY, 2))
    # The resident model: TTFT is the prefill of 20 tokens, TPOT one step.
    (o,) = _run([Arrival(0.0, m0, 20, 5)], tmp_path).outcomes
    assert (o.ttft_s, o.tpot_s) == pytest.approx((0.03, 0.004))
    # Another member: its weights are swapped in first (20 ms).
    r = _run([Arrival(0.0, m1, 20, 5)], tmp_path)
    assert (r.outcomes[0].ttft_s, r.outcomes[0].tpot_s) == pytest.approx((0.05, 0.004))
    assert r.switches == 1 and r.preemptions == 0
    assert latencies(r) == [Latency(pytest.approx(0.05), pytest.approx(0.004), True)]


def test_the_simulated_half_is_deterministic_and_preempts(tmp_path):
    m0, m1 = (m.name for m in aliases(TINY, 2))
    trace = [Arrival(0.0, m0, 20, 5), Arrival(0.001, m1, 30, 5)]
    a, b = _run(trace, tmp_path, "a.csv"), _run(trace, tmp_path, "b.csv")
    assert a.outcomes == b.outcomes and a.summary == b.summary
    # m1's new request preempts m0 after its first token (prefill first);
    # m0 resumes after a swap back and a re-prefill of prompt + delivered.
    assert a.switches == 2 and a.preemptions == 1
    assert a.outcomes[0].ttft_s == pytest.approx(0.03)
    # Its 4 gaps: m1's swap, prefill of 30 and 4 steps; the swap back, the
    # re-prefill of 21 tokens (its next token); 3 steps.
    assert 4 * a.outcomes[0].tpot_s == pytest.approx(
        0.02 + 0.04 + 4 * 0.004 + 0.02 + 0.031 + 3 * 0.004, abs=2e-3)
    assert compare(latencies(a), latencies(b))["ttft_rel_error"] == 0.0


def test_the_serving_path_is_charged_as_measured(tmp_path):
    m0, _ = (m.name for m in aliases(TINY, 2))
    trace = [Arrival(0.0, m0, 20, 5)]
    # 40 ms of path: the request reaches the engine 40 ms after it was sent.
    r = simulate_timeshared(trace, DEVICE, aliases(TINY, 2), ttft_slo_s=0.06, tpot_slo_s=0.1,
                            turns=CPU_TURNS, kv_cache_bytes=2**20, path_s=0.04)
    (o,) = r.outcomes
    assert (o.arrived_s, o.ttft_s, o.tpot_s) == pytest.approx((0.0, 0.07, 0.004))
    assert not o.met_slo and r.summary["slo_attainment"] == 0.0  # 70 ms > 60 ms
    # The path is an idle TTFT less the profile's prefill (10 ms + 1 ms/token).
    assert path_latency_s(DEVICE, 0.05, 20) == pytest.approx(0.02)
    assert path_latency_s(DEVICE, 0.01, 20) == 0.0
    # The step as requests see it through the front door replaces the engine's.
    served = served_profile(DEVICE, {1: 0.006, 8: 0.01})
    (s,) = simulate_timeshared(trace, served, aliases(TINY, 2), 1.0, 0.1, turns=CPU_TURNS,
                               kv_cache_bytes=2**20).outcomes
    assert s.tpot_s == pytest.approx(0.006)
    assert served.measured.notes["engine_decode_step_s_by_batch"] == {1: 0.004, 8: 0.006}
