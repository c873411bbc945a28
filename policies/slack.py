"""Slack-driven turns for models time-sharing one device (Shoal's ``token``
discipline; ``policies/quota.py`` is Aegaeon's fixed-quota alternative).

Pure arithmetic over request timings, used by the turn machine
(``policies/turns.py``) that the engine worker and the simulator both run.

Every waiting request has a latest moment its model must get the device
back for it to still meet its SLO, its *laxity* from now:

- not started: ``arrived + TTFT_SLO - switch - now``;
- started, k of n tokens out: it meets TPOT (mean gap after the first token)
  if it ends by ``first + (n - 1) * TPOT_SLO``, and needs ``(n - k) * step``
  more device time: ``first + (n - 1) * TPOT_SLO - (n - k) * step - switch - now``.

A running request's laxity holds still (each step brings its finish one
step nearer, and the clock one step on), a waiting one's falls with the
clock: a request that has run fast has banked ``TPOT_SLO - step`` per token,
which is what pays for the other models' turns. The device goes to the
model with the least laxity, with hysteresis so turns are long enough to
amortize a switch, and to a new request's model early when the running one
can spare the detour (prefill first, for TTFT), and a model joins the
rotation only while the decoding models' TPOT needs fit (admission); see
``next_model``. A request with negative laxity will miss its SLO anyway:
it stops counting as urgent and is served in arrival order when nothing
feasible waits, so one late request does not drag others down with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestTiming:
    arrived: float
    first_token_at: float | None  # None: no token yet
    generated: int  # tokens out so far
    max_tokens: int


def laxity(r: RequestTiming, now: float, ttft_slo_s: float, tpot_slo_s: float,
           step_s: float, switch_s: float) -> float:
    """Seconds until ``r``'s model must have the device again (negative: late)."""
    if r.first_token_at is None:
        return r.arrived + ttft_slo_s - switch_s - now
    finish_by = r.first_token_at + (r.max_tokens - 1) * tpot_slo_s
    return finish_by - (r.max_tokens - r.generated) * step_s - switch_s - now


@dataclass(frozen=True)
class ModelSlack:
    """One model's waiting requests, summarized for the turn decision."""

    name: str
    laxity: float | None  # least laxity of its requests that can still make it
    has_new: bool  # a request waits for its prefill
    waited_s: float  # since its oldest waiting request was last served (or arrived)
    decoding: bool = False  # some request has its first token: it is in the rotation
    share: float = 0.0  # device share its decoding needs: step / TPOT SLO


def summarize(name: str, laxities: Iterable[float], has_new: bool, waited_s: float,
              decoding: bool = False, share: float = 0.0) -> ModelSlack:
    feasible = [x for x in laxities if x >= 0]
    return ModelSlack(name, min(feasible) if feasible else None, has_new, waited_s,
                      decoding, share)


def next_model(current: ModelSlack | None, others: list[ModelSlack], *, margin_s: float,
               hysteresis_s: float, prefill_turn_s: float, starve_s: float,
               capacity: float = 1.0) -> str | None:
    """Which model gets the device now; None keeps ``current`` on it.

    ``current`` is the model on the device, its requests viewed as if
    preempted now (None: the device is free). In order:

    1. a model that must start (laxity down to ``margin_s``) and is more
       urgent than the current one;
    2. least laxity first, with hysteresis: a model whose laxity is
       ``hysteresis_s`` below the current one's. A running request's laxity
       holds still while a waiting one's falls with the clock, so turns last
       about ``hysteresis_s`` and the slack is spent evenly, not by one
       model at the others' expense;
    3. prefill first: a model with a new request, if the detour
       (``prefill_turn_s``: two switches and a short turn) leaves the current
       model comfortable slack;
    4. a model whose oldest request has waited ``starve_s``, even if late.

    Admission: a model with no request decoding yet joins the rotation only
    if the rotation's TPOT needs (the sum of ``share``, Aegaeon's sum of
    1/n) stay within ``capacity``; otherwise its new requests wait, spending
    TTFT slack, until a decoding model finishes. Time-sharing past that
    point would make every model miss its TPOT instead of one request its
    TTFT.
    """
    cur = _laxity_of(current)
    others = _admitted(current, others, capacity)

    def must_start(o: ModelSlack) -> bool:
        return o.laxity is not None and o.laxity <= margin_s and o.laxity <= cur

    def least_laxity(o: ModelSlack) -> bool:
        return o.laxity is not None and o.laxity < cur - hysteresis_s

    def prefill(o: ModelSlack) -> bool:
        return o.has_new and o.laxity is not None and \
            cur > prefill_turn_s + margin_s + hysteresis_s

    for rule in (must_start, least_laxity, prefill):
        due = [o for o in others if rule(o)]
        if due:
            return min(due, key=lambda o: (o.laxity, o.name)).name
    starved = [o for o in others if o.waited_s >= starve_s]
    if starved:
        return max(starved, key=lambda o: (o.waited_s, o.name)).name
    if current is not None:
        return None
    feasible = [o for o in others if o.laxity is not None]
    if feasible:
        return min(feasible, key=lambda o: (o.laxity, o.name)).name
    return max(others, key=lambda o: (o.waited_s, o.name)).name if others else None


def quiet_s(current: ModelSlack | None, others: list[ModelSlack], *, margin_s: float,
            hysteresis_s: float, prefill_turn_s: float, starve_s: float,
            capacity: float = 1.0) -> float:
    """How long ``next_model`` (same arguments) keeps answering None if
    nothing changes but the clock: the waiting models' laxities fall as the
    time passes and their waits grow, the current model's laxity holds
    still (see the module docstring). 0: it may answer otherwise now; inf:
    the clock alone never makes it. Rules 1, 2 and 4 of ``next_model`` fire
    at a time that follows from a laxity or a wait; rule 3 fires now or not
    at all. A laxity that turns negative only ever makes a rule fire later,
    so leaving that out keeps the answer a lower bound."""
    if current is None:
        return 0.0
    cur = _laxity_of(current)
    t = float("inf")
    for o in _admitted(current, others, capacity):
        if o.laxity is not None:
            t = min(t, o.laxity - min(margin_s, cur), o.laxity - (cur - hysteresis_s))
            if o.has_new and cur > prefill_turn_s + margin_s + hysteresis_s:
                t = 0.0
        t = min(t, starve_s - o.waited_s)
    return max(0.0, t)


def _laxity_of(current: ModelSlack | None) -> float:
    """The current model's laxity; inf if it has no feasible request (or the device is free)."""
    return current.laxity if current is not None and current.laxity is not None else float("inf")


def _admitted(current: ModelSlack | None, others: list[ModelSlack],
              capacity: float) -> list[ModelSlack]:
    """``others`` that may take a turn: those decoding already, and new
    models only while the rotation's TPOT needs stay within ``capacity``."""
    load = sum(m.share for m in [current, *others] if m is not None and m.decoding)
    return [o for o in others if o.decoding or load + o.share <= capacity]
