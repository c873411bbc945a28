"""The turn machine (policies/turns.py) on an injected clock: no engine, no Ray."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.slack import ModelSlack, next_model, quiet_s
from policies.turns import AEGAEON, REQUEST, TOKEN, EndTurn, Keep, TurnConfig, TurnMachine, \
    TurnRequest

SLO = {"a": (10.0, 0.1), "b": (10.0, 0.1), "c": (10.0, 0.1)}


def machine(discipline: str = TOKEN, **kw) -> TurnMachine:
    return TurnMachine(TurnConfig(discipline=discipline, **kw), SLO.__getitem__)


def run_turn(m: TurnMachine, model: str, t: float, step_s: float, steps: int) -> float:
    """Begin ``model``'s turn at ``t`` and decode ``steps`` steps of its batch."""
    batch = m.begin(model, t, t)
    for r in batch:
        m.segment_started(r)
    for _ in range(steps):
        t += step_s
        for r in batch:
            if r.in_engine:
                m.delivered(r, 1, t)
    return t


def test_a_model_alone_is_never_preempted_and_a_second_one_gets_its_turn():
    m = machine(TOKEN, min_quota_s=0.05)
    a = TurnRequest("r1", "a", 0.0, 500)
    m.arrive(a)
    assert m.pick(0.0) == "a"
    t = run_turn(m, "a", 0.0, 0.02, 50)
    assert m.judge(t) == Keep(None)  # alone: judged again only when something happens
    b = TurnRequest("r2", "b", t, 100)
    assert not m.arrive(b)  # not its turn: it waits
    verdict = m.judge(t)
    # b is new and a has slack to spare: prefill first, after min_quota_s.
    assert verdict == EndTurn("b")
    assert m.preempt() == [a] and not a.in_engine
    m.close(t)
    assert m.pick(t) == "b" and m.totals.preemptions == 1


def test_a_request_of_the_running_model_joins_its_turn_at_once():
    m = machine(TOKEN)
    m.arrive(TurnRequest("r1", "a", 0.0, 50))
    m.pick(0.0)
    m.begin("a", 0.0, 0.0)
    late = TurnRequest("r2", "a", 0.1, 50)
    assert m.arrive(late) and late.in_engine


@pytest.mark.parametrize("discipline", [TOKEN, AEGAEON])
def test_a_turn_never_ends_before_each_of_its_requests_has_moved(discipline):
    """A re-prefill longer than the quota: the turn waits for the resumed
    request's first output, however late, before it may end. Without that,
    short turns and long contexts keep the device busy with no progress."""
    m = machine(discipline, min_quota_s=0.01, max_round_s=0.05)
    a, b = TurnRequest("r1", "a", 0.0, 500), TurnRequest("r2", "b", 0.0, 500)
    m.arrive(a)
    m.arrive(b)
    m.switched("a", 0.01)
    m.switched("b", 0.01)
    assert m.pick(0.0) == "a"
    m.begin("a", 0.0, 0.0)
    m.segment_started(a)
    assert isinstance(m.judge(10.0), Keep)  # long past any quota: a has not moved
    m.delivered(a, 1, 10.0)
    assert isinstance(m.judge(10.02), EndTurn)  # it has: b's turn may come


def test_aegaeon_ends_a_turn_at_its_quota_when_others_wait():
    m = machine(AEGAEON, min_quota_s=0.01, max_round_s=1.0)
    for rid, model in (("r1", "a"), ("r2", "b")):
        m.arrive(TurnRequest(rid, model, 0.0, 500))
    m.switched("a", 0.05)
    m.switched("b", 0.05)
    m.pick(0.0)
    (a,) = m.begin("a", 0.0, 0.0)
    m.segment_started(a)
    m.delivered(a, 1, 0.001)  # its prefill is done: the turn may end at its quota
    quota = m.est["a"].quota_s
    assert 0.01 <= quota <= 1.0
    assert m.judge(quota / 2) == Keep(pytest.approx(quota / 2))
    assert m.judge(quota) == EndTurn()


def test_request_discipline_serves_the_oldest_request_first_and_never_preempts():
    m = machine(REQUEST)
    m.arrive(TurnRequest("r1", "b", 1.0, 10))
    m.arrive(TurnRequest("r2", "a", 2.0, 10))
    assert m.pick(3.0) == "b"
    m.begin("b", 3.0, 3.0)
    assert m.judge(100.0) == Keep(None)


def test_the_switch_cost_is_learnt_from_the_first_resumed_token():
    """A turn that resumes preempted requests measures swap + re-prefill."""
    m = machine(TOKEN)
    r = TurnRequest("r1", "a", 0.0, 100)
    m.arrive(r)
    m.pick(0.0)
    run_turn(m, "a", 0.0, 0.02, 5)  # r has delivered 5 tokens
    m.preempt()
    m.close(0.1)
    m.switched("a", 0.3)  # back after another model's turn: the swap took 0.3 s
    m.begin("a", 1.0, 1.3)
    m.segment_started(r)
    m.delivered(r, 1, 1.5)  # re-prefill done 0.2 s after the swap
    m.preempt()
    m.close(2.0)
    assert m.est["a"].switch_s == pytest.approx(0.8 * 0.3 + 0.2 * 0.5)  # ewma of 0.3, then 0.5


slacks = st.builds(ModelSlack, name=st.sampled_from("abcdef"),
                   laxity=st.one_of(st.none(), st.floats(0.0, 20.0)),
                   has_new=st.booleans(), waited_s=st.floats(0.0, 5.0),
                   decoding=st.booleans(), share=st.floats(0.0, 0.6))
KNOBS = {"margin_s": 0.05, "hysteresis_s": 0.8, "prefill_turn_s": 0.3, "starve_s": 4.0,
         "capacity": 0.875}


@settings(max_examples=400, deadline=None)
@given(slacks, st.lists(slacks, max_size=5), st.floats(0.0, 1.0))
def test_quiet_s_is_a_lower_bound_on_when_next_model_changes_its_mind(cur, others, frac):
    """For any time before ``quiet_s`` (laxities of the waiting models
    falling with the clock, their waits growing) the current model stays."""
    q = quiet_s(cur, others, **KNOBS)
    if q == 0 or math.isinf(q):
        return
    dt = frac * q * 0.999

    def later(o: ModelSlack) -> ModelSlack:
        return ModelSlack(o.name, None if o.laxity is None else o.laxity - dt, o.has_new,
                          o.waited_s + dt, o.decoding, o.share)

    assert next_model(cur, [later(o) for o in others], **KNOBS) is None
