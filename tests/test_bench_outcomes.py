"""The arithmetic of ``shoal bench load`` and ``shoal bench chaos``
(``cluster/bench/outcomes.py``): how a request's end is classified, the
percentiles and the sustainable-rate search, and goals that are undefined
(None) rather than met when there is nothing to judge. No Ray."""

from __future__ import annotations

from cluster.bench.outcomes import (SLO, Ending, Outcome, chaos_entry, classify_body,
                                    classify_stream, load_goals, next_rate, percentile,
                                    summarize, sustainable_rate)

SLO_ = SLO(ttft_s=1.0, tpot_s=0.1)


def ok(e2e=0.5, streaming=True, ttft=0.2, tpot=0.01, tokens=10, text="x"):
    return Outcome(Ending.OK, e2e, streaming, ttft_s=ttft if streaming else None,
                   tpot_s=tpot if streaming else None, tokens=tokens, text=text)


def refused(status=429, e2e=0.01, retry_after=True):
    return Outcome(Ending.REFUSED, e2e, False, status=status, retry_after=retry_after)


def test_a_stream_without_done_is_lost_and_an_error_event_is_not():
    assert classify_stream(done=True, error_event=False, tokens=5, want_tokens=5) == \
        (Ending.OK, "")
    assert classify_stream(done=False, error_event=False, tokens=5, want_tokens=5) == \
        (Ending.LOST, "no_done")
    assert classify_stream(done=True, error_event=False, tokens=3, want_tokens=5) == \
        (Ending.LOST, "short")
    # An error event is a clear error, [DONE] or not, whatever came before.
    assert classify_stream(done=False, error_event=True, tokens=2, want_tokens=5)[0] is \
        Ending.ERROR_EVENT


def test_a_body_is_complete_only_with_a_finish_reason_and_every_token():
    assert classify_body("length", 5, 5) == (Ending.OK, "")
    assert classify_body(None, 5, 5) == (Ending.LOST, "short")
    assert classify_body("length", 4, 5) == (Ending.LOST, "short")


def test_percentile_is_nearest_rank_and_none_without_samples():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == 50.0 and percentile(xs, 99) == 99.0
    assert percentile(list(reversed(xs)), 100) == 100.0


def test_summary_counts_each_ending_once_and_times_only_what_it_says():
    outs = [ok(), ok(streaming=False, e2e=0.4), refused(429), refused(503, retry_after=False),
            Outcome(Ending.ERROR_EVENT, 1.0, True),
            Outcome(Ending.LOST, 60.0, True, why="no_done"),
            Outcome(Ending.LOST, 60.0, False, why="timeout")]
    row = summarize(outs, SLO_)
    assert row["requests"] == 7 and row["successes"] == 2
    assert row["errors_by_status"] == {"429": 1, "503": 1} and row["error_events"] == 1
    assert row["lost"] == 2 and row["lost_by_why"] == {"no_done": 1, "timeout": 1}
    assert row["within_slo"] == 2 and row["slo_attainment"] == round(2 / 7, 4)
    assert row["ttft_s_p50"] == 0.2  # streams only
    assert row["overload_answers"] == 2 and row["overload_with_retry_after"] == 1
    assert row["e2e_s_p99"] == 0.5  # successes only: lost ones do not hide in the latency


def test_an_empty_rate_has_no_figures_rather_than_zeros():
    row = summarize([], SLO_)
    assert row["success_rate"] is None and row["slo_attainment"] is None
    assert row["ttft_s_p50"] is None and row["overload_s_p99"] is None


def test_slo_for_non_streaming_allows_ttft_plus_tpot_per_token():
    assert SLO_.met(ok(streaming=False, e2e=1.0 + 0.1 * 9, tokens=10))
    assert not SLO_.met(ok(streaming=False, e2e=1.0 + 0.1 * 9 + 0.01, tokens=10))
    assert not SLO_.met(ok(ttft=1.5))
    assert not SLO_.met(refused())


def row(rate, attainment, lost=0, overload=0, p99=None, retry=0):
    return {"rate": rate, "requests": 10, "slo_attainment": attainment, "lost": lost,
            "overload_answers": overload, "overload_s_p99": p99,
            "overload_with_retry_after": retry}


def test_sustainable_rate_needs_every_lower_rate_sustained():
    assert sustainable_rate([row(1, 1.0), row(2, 0.96), row(4, 0.5)], 0.95) == 2
    assert sustainable_rate([row(1, 1.0), row(2, 0.5), row(4, 0.99)], 0.95) == 1
    assert sustainable_rate([row(1, 0.5)], 0.95) is None  # undefined, not 0


def test_the_sweep_steps_up_until_a_failed_rate_at_twice_the_sustainable_one():
    assert next_rate([row(1, 1.0)], 0.95, 2, 2, 10) == 2
    assert next_rate([row(1, 1.0), row(2, 1.0)], 0.95, 2, 2, 10) == 4
    # 4 failed and is 2x the sustainable 2: done.
    assert next_rate([row(1, 1.0), row(2, 1.0), row(4, 0.5)], 0.95, 2, 2, 10) is None
    # Failed at once: nothing sustained, so stepping up cannot find it.
    assert next_rate([row(1, 0.5)], 0.95, 2, 2, 10) is None
    # The bound on the count of rates always ends it.
    assert next_rate([row(1, 1.0), row(2, 1.0)], 0.95, 2, 2, 2) is None


def test_load_goals_are_none_when_nothing_was_refused():
    g = load_goals([row(1, 1.0), row(2, 1.0)], 1.0)
    assert g["lost_zero_at_every_rate"] is True and g["overload_answers_fast"] is None
    g = load_goals([row(1, 1.0), row(4, 0.5, overload=3, p99=0.05, retry=3)], 1.0)
    assert g["overload_answers_fast"] is True
    g = load_goals([row(4, 0.5, overload=3, p99=0.05, retry=2)], 1.0)  # one lacks Retry-After
    assert g["overload_answers_fast"] is False
    g = load_goals([row(4, 0.5, lost=1, overload=3, p99=2.0, retry=3)], 1.0)
    assert g["lost_zero_at_every_rate"] is False and g["overload_answers_fast"] is False
    assert load_goals([], 1.0)["lost_zero_at_every_rate"] is None


def test_a_chaos_entry_meets_its_goal_only_when_everything_holds():
    outs = [ok(text="ref"), ok(streaming=False, text="ref"), refused(503)]
    e = chaos_entry(outs, "ref", 12.0, True, 0)
    assert e["completed"] == 2 and e["clear_errors"] == 1 and e["lost"] == 0
    assert e["outputs_identical"] is True and e["goal_met"] is True
    assert chaos_entry(outs, "other", 12.0, True, 0)["goal_met"] is False
    assert chaos_entry(outs, "ref", None, True, 0)["goal_met"] is False  # never recovered
    assert chaos_entry(outs, "ref", 61.0, True, 0)["goal_met"] is False
    assert chaos_entry(outs, "ref", 12.0, True, 1)["goal_met"] is False  # an orphan
    lost = chaos_entry([Outcome(Ending.LOST, 1.0, True, why="no_done")], "ref", 5.0, True, 0)
    assert lost["lost"] == 1 and lost["outputs_identical"] is None and not lost["goal_met"]
