"""Turn policies for time-shared devices: Aegaeon's quotas (policies/quota.py) and
Shoal's slack-driven turns (policies/slack.py). Pure arithmetic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.quota import decode_quotas
from policies.slack import ModelSlack, RequestTiming, laxity, next_model, summarize


def test_each_model_averages_its_slo_share():
    """Model i makes quota_i / step_i tokens per round, so its average TPOT is
    round / tokens = alpha * SLO_i, with alpha the slo_fraction here."""
    slo = {"a": 0.1, "b": 0.2, "c": 0.05}
    step = {"a": 0.01, "b": 0.01, "c": 0.005}
    q = decode_quotas(slo, step, switch_s=0.03, slo_fraction=0.5)
    assert q.load == pytest.approx(0.1 + 0.05 + 0.1)
    for m in slo:
        tpot = q.round_s / (q.quota_s[m] / step[m])
        assert tpot == pytest.approx(0.5 * slo[m])
    assert q.round_s == pytest.approx(sum(q.quota_s.values()) + 0.03)


def test_more_steps_per_slo_interval_means_a_shorter_quota():
    """A model with more steps per SLO interval gets a shorter quota."""
    q = decode_quotas({"fast": 0.1, "slow": 0.1}, {"fast": 0.001, "slow": 0.01}, 0.02)
    assert q.quota_s["fast"] < q.quota_s["slow"]


def test_overload_is_reported_and_rounds_stay_bounded():
    """sum 1/n >= 1: no quotas meet the SLOs; alpha's max_round_s term keeps
    the quotas finite (the smallest-n model gets max_round_s)."""
    q = decode_quotas({"a": 0.02, "b": 0.02}, {"a": 0.015, "b": 0.015}, 0.01, max_round_s=4.0)
    assert q.overloaded
    assert max(q.quota_s.values()) == pytest.approx(4.0)


def test_no_switch_cost_means_no_reason_to_switch_often():
    q = decode_quotas({"a": 0.1}, {"a": 0.01}, 0.0, max_round_s=2.0)
    assert q.quota_s == {"a": 2.0}


@given(st.dictionaries(st.sampled_from("abcdefgh"),
                       st.tuples(st.floats(0.01, 1.0), st.floats(0.0005, 0.05)), min_size=1),
       st.floats(0.0001, 0.5), st.floats(0.1, 1.0))
def test_quotas_are_positive_and_at_most_the_round(models, switch, frac):
    slo = {m: v[0] for m, v in models.items()}
    step = {m: v[1] for m, v in models.items()}
    q = decode_quotas(slo, step, switch, slo_fraction=frac)
    assert set(q.quota_s) == set(models)
    assert all(0 < x <= q.round_s for x in q.quota_s.values())


# --- policies/slack.py -------------------------------------------------------

SLO = {"ttft_slo_s": 1.0, "tpot_slo_s": 0.01, "step_s": 0.002, "switch_s": 0.005}
KNOBS = {"margin_s": 0.02, "hysteresis_s": 0.05, "prefill_turn_s": 0.03, "starve_s": 4.0}


def test_a_new_request_must_start_before_its_ttft_deadline():
    r = RequestTiming(arrived=10.0, first_token_at=None, generated=0, max_tokens=100)
    assert laxity(r, 10.2, **SLO) == pytest.approx(1.0 - 0.2 - 0.005)


def test_a_running_request_holds_its_laxity_and_a_waiting_one_loses_it():
    def at(now, generated):
        r = RequestTiming(arrived=0.0, first_token_at=1.0, generated=generated, max_tokens=101)
        return laxity(r, now, **SLO)
    running = [at(2.0 + i * SLO["step_s"], 10 + i) for i in range(5)]
    assert running == pytest.approx([running[0]] * 5)
    assert at(2.5, 10) == pytest.approx(at(2.0, 10) - 0.5)
    # 100 gaps of 10 ms allowed from t=1: it must end by 2.0; 91 tokens at 2 ms remain.
    assert at(1.5, 10) == pytest.approx(2.0 - 91 * 0.002 - 0.005 - 1.5)


def ms(name, lax, new=False, waited=0.0):
    return ModelSlack(name, lax, new, waited)


def test_a_model_out_of_slack_takes_the_device_from_a_comfortable_one():
    assert next_model(ms("cur", 0.5), [ms("b", 0.01), ms("c", 0.015)], **KNOBS) == "b"
    # unless the current one is even more urgent
    assert next_model(ms("cur", 0.005), [ms("b", 0.01)], **KNOBS) is None


def test_least_laxity_first_with_hysteresis():
    assert next_model(ms("cur", 0.30), [ms("b", 0.26)], **KNOBS) is None  # within 50 ms
    assert next_model(ms("cur", 0.30), [ms("b", 0.24), ms("c", 0.20)], **KNOBS) == "c"


def test_prefill_first_only_when_the_running_model_can_spare_the_detour():
    assert next_model(ms("cur", 0.5), [ms("b", 0.9, new=True)], **KNOBS) == "b"
    assert next_model(ms("cur", 0.09), [ms("b", 0.9, new=True)], **KNOBS) is None


def test_late_requests_do_not_count_as_urgent_but_do_not_starve():
    late = summarize("b", [-0.3, -0.1], has_new=False, waited_s=1.0)
    assert late.laxity is None
    assert next_model(ms("cur", 0.5), [late], **KNOBS) is None
    starved = summarize("b", [-0.3], has_new=False, waited_s=4.5)
    assert next_model(ms("cur", 0.5), [starved], **KNOBS) == "b"


def test_a_free_device_goes_to_the_least_laxity_then_the_longest_waiting():
    assert next_model(None, [ms("b", 0.4), ms("c", 0.3)], **KNOBS) == "c"
    assert next_model(None, [ms("b", None, waited=1.0), ms("c", None, waited=2.0)],
                      **KNOBS) == "c"
    assert next_model(None, [], **KNOBS) is None


def test_a_new_model_joins_the_rotation_only_while_its_tpot_needs_fit():
    """Two models decode, each needing 40% of the device for its TPOT; a
    third would push the rotation past capacity: its new request waits
    (spending TTFT slack) instead of making all three miss their TPOT."""
    a = ModelSlack("a", 0.5, False, 0.0, decoding=True, share=0.4)
    b = ModelSlack("b", 0.47, False, 0.1, decoding=True, share=0.4)  # within hysteresis
    new = ModelSlack("c", 0.3, True, 0.1, decoding=False, share=0.4)
    assert next_model(a, [b, new], capacity=0.9, **KNOBS) is None
    assert next_model(None, [new], capacity=0.9, **KNOBS) == "c"  # alone it fits
    small = ModelSlack("c", 0.3, True, 0.1, decoding=False, share=0.05)
    assert next_model(a, [b, small], capacity=0.9, **KNOBS) == "c"  # prefill first
