"""Benchmark verdicts: a goal is met, missed, or undecided (None) when its
ratio has no baseline; it is never reported met on an undefined ratio."""

from __future__ import annotations

from cluster.bench.serve import _goals
from cluster.bench.timeshare import _goal, sustainable


def rows(*attainments: tuple[float, float]) -> list[dict]:
    return [{"rate": r, "slo_attainment": a} for r, a in attainments]


def test_sustainable_is_the_highest_rate_with_every_lower_rate_meeting_the_goal():
    assert sustainable(rows((0.25, 1.0), (0.5, 0.97), (1, 0.9), (2, 0.99))) == 0.5
    assert sustainable(rows((0.25, 0.82), (0.5, 0.7))) == 0.0
    assert sustainable(rows((1, 0.99), (0.5, 1.0))) == 1  # order of rows does not matter


def test_the_timeshare_goal_is_undecided_without_a_request_level_baseline():
    token = {"sustainable_rate": 0.5, "sustainable_rate_by_repeat": [0.5, 0.25]}
    none = {"sustainable_rate": 0.0, "sustainable_rate_by_repeat": [0.0, 0.0]}
    verdict = _goal(token, none)
    assert verdict["token_over_request"] is None
    assert verdict["goal_token_at_least_2x_request"] is None  # not True, not False
    assert verdict["token_over_request_spread"] is None
    some = {"sustainable_rate": 0.25, "sustainable_rate_by_repeat": [0.25, 0.0]}
    verdict = _goal(token, some)
    assert verdict["token_over_request"] == 2.0 and verdict["goal_token_at_least_2x_request"]
    assert verdict["token_over_request_by_repeat"] == [2.0, None]
    assert verdict["token_over_request_spread"] == [2.0, 2.0]


def test_the_serve_goals_are_undecided_when_a_peer_is_missing():
    row = {"output_tok_s": 400.0, "tpot_ms_mean": 17.0, "failed": 0}
    goals = _goals({"shoal": {"8": row}, "vllm": {"8": {**row, "output_tok_s": 0.0}}})
    assert goals["shoal_over_vllm_tok_s"] is None
    assert goals["tok_s_at_least_0.75x_vllm"] is None
    assert goals["tok_s_at_least_1.5x_rayserve_llm"] is None  # Ray Serve LLM not measured
    assert goals["no_failures"] is True
    goals = _goals({"shoal": {"8": row}, "vllm": {"8": {**row, "output_tok_s": 1000.0,
                                                         "tpot_ms_mean": 5.0}}})
    assert goals["shoal_over_vllm_tok_s"] == 0.4 and goals["tok_s_at_least_0.75x_vllm"] is False
    assert goals["tpot_at_most_1.5x_vllm"] is False


def test_machine_cpu_counts_other_processes_and_not_the_client():
    """A child burning CPU shows up in the servers' CPU; this process's own
    (the load generator's) is left out."""
    import subprocess
    import sys
    import time

    from cluster.bench.cpu_time import machine_cpu_s

    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.3:  # this process: 0.3 s of CPU of its own
        pass
    mine = time.process_time()
    with_me, without_me = machine_cpu_s(skip_self=False), machine_cpu_s()
    assert abs((with_me - without_me) - mine) < 0.1  # the difference is this process
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt=time.process_time()\n"
                              "while time.process_time()-t<0.6: pass\ntime.sleep(30)"])
    try:
        start = machine_cpu_s()
        time.sleep(2.0)  # the child spins 0.6 s of CPU, then sleeps (still alive)
        burnt = machine_cpu_s() - start
    finally:
        child.kill()
    assert burnt >= 0.5


def test_the_serve_cpu_ratios_are_reported_and_undefined_without_a_peer():
    row = {"output_tok_s": 400.0, "tpot_ms_mean": 17.0, "failed": 0,
           "server_cpu_ms_per_token": 1.5}
    goals = _goals({"shoal": {"8": row}, "vllm": {"8": {**row, "server_cpu_ms_per_token": 0.5}}})
    assert goals["shoal_over_vllm_server_cpu_per_token"] == 3.0
    assert goals["shoal_over_rayserve_llm_server_cpu_per_token"] is None
