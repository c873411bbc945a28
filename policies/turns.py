"""Whose turn it is on a time-shared device: the turn logic as a state machine.

The models of one family share one engine and take turns on it between
decode steps (Aegaeon-style token-level time-sharing). This module decides
the turns; it never touches an engine and has no clock of its own. Two
drivers run the very same object:

- the engine worker's ``TimeShareScheduler`` (``cluster/engine/timeshare.py``),
  on the wall clock, with vLLM doing the work;
- the simulator's engine (``cluster/sim/engine.py``), on simulated time, with
  a cost model doing the work.

**Events in** (each stamped by the driver's clock): a request arrives
(``arrive``), its engine segment starts (``segment_started``), it delivers
tokens (``delivered``, one call per engine output: a decode step or several),
it ends or goes away (``drop``), a weight switch is done (``switched``), a
model fails or leaves the device (``fail``, ``leave``).

**Decisions out**: the model that gets the free device (``pick``), the
requests a turn starts (``begin``, and ``arrive`` for a request joining the
running turn), whether the turn goes on and for how long before it is judged
again, or ends (``judge``: ``Keep`` or ``EndTurn``), the requests it preempts
(``preempt``), and the estimates the turn taught (``close``). A turn is
``pick -> [switch] -> begin -> judge ... -> preempt -> close``.

Disciplines (``TurnConfig.discipline``):

- ``token``: slack-driven turns (``policies/slack.py``): the device goes to
  the model whose requests run out of SLO slack first, with hysteresis; a
  new request's model gets an early turn when the running one can spare it;
  admission keeps the rotation's TPOT needs within the device.
- ``aegaeon``: Aegaeon's fixed decode quotas (``policies/quota.py``);
  prefill first, then round-robin; a model left waiting two rounds goes first.
- ``request``: a model keeps the device until its requests are done.

Step times and switch costs are measured online from the events: a step is
the gap between two outputs of one engine segment per token; a switch costs
the swap plus the re-prefill of the preempted requests, until the turn's
first resumed token.

Invariants: a model alone on the device is never preempted; a turn never
ends before every request it started has had an output in that turn (its
prefill or re-prefill is done), so each turn moves every one of its
requests forward and no mix of short turns and long re-prefills can keep the
device busy without progress; the same events at the same times give the
same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from policies.quota import decode_quotas
from policies.turn_data import (AEGAEON, DISCIPLINES, REQUEST, SWITCH_SHARE, TOKEN, EndTurn,
                                Estimate, Keep, Totals, TurnConfig, TurnRequest)
from policies.slack import ModelSlack, RequestTiming, laxity, next_model, quiet_s, summarize
from policies.smoothing import ewma

__all__ = ["AEGAEON", "DISCIPLINES", "REQUEST", "SWITCH_SHARE", "TOKEN", "EndTurn", "Estimate",
           "Keep", "Totals", "TurnConfig", "TurnMachine", "TurnRequest"]

@dataclass
class _Turn:
    """The running turn's own state (one at a time)."""

    model: str
    t0: float  # when the driver took the device for it (before any switch)
    discipline: str  # fixed for the turn, even if the config changes meanwhile
    resumed: bool  # it restarts preempted requests: its first token measures the switch
    quota_s: float = math.inf
    deadline: float = math.inf


class TurnMachine:
    """The turns of the models sharing one engine; see the module docstring.

    ``slo(model)`` gives a model's (TTFT, TPOT) targets; it is asked at every
    decision, so a changed SLO takes effect at once.
    """

    def __init__(self, config: TurnConfig, slo: Callable[[str], tuple[float, float]]):
        self.config = config
        self._slo = slo
        self.queues: dict[str, dict[str, TurnRequest]] = {}  # model -> request id -> request
        self.est: dict[str, Estimate] = {}
        self.order: list[str] = []  # round-robin order: models by first arrival
        self.current: str | None = None  # the model whose turn it is
        self.last: str | None = None  # the model of the last turn
        self.next: str | None = None  # "token": chosen when the last turn ended
        self.round_s = 0.0  # "aegaeon": the last round's length
        self.turn_started = 0.0
        self.turn_first: float | None = None  # first resumed token of this turn
        self.totals = Totals()
        self._turn: _Turn | None = None
        # Set to a list to record every decision with its inputs' time: the
        # live-vs-simulator test compares two drivers' records.
        self.log: list[tuple] | None = None

    # ------------------------------------------------------------- events
    def arrive(self, req: TurnRequest) -> bool:
        """A request arrives. True: its model's turn is running, it joins it
        now (the driver starts it)."""
        self.queues.setdefault(req.model, {})[req.rid] = req
        if req.model not in self.order:
            self.order.append(req.model)
        joined = req.model == self.current
        if joined:
            self._start(req)
        if self.log is not None:
            self.log.append(("arrive", req.rid, joined))
        return joined

    def segment_started(self, req: TurnRequest) -> None:
        """``req``'s engine segment begins (its first, or a resume)."""
        req.segments += 1
        req.seg_start_tokens, req.seg_prev_at = req.generated, None
        self.est.setdefault(req.model, Estimate())

    def delivered(self, req: TurnRequest, tokens: int, now: float) -> None:
        """One engine output of ``req`` with ``tokens`` new tokens, at ``now``."""
        est = self.est.setdefault(req.model, Estimate())
        if req.seg_prev_at is None and req.seg_start_tokens and self.turn_first is None:
            self.turn_first = now  # a resumed request's first output: the switch is paid
        if req.seg_prev_at is not None and tokens:
            est.step_s = ewma(est.step_s, (now - req.seg_prev_at) / tokens)
        req.seg_prev_at = now
        if req.first_at is None and tokens:
            req.first_at = now
        req.generated += tokens

    def drop(self, req: TurnRequest) -> None:
        """``req`` finished, failed or was aborted."""
        q = self.queues.get(req.model, {})
        if q.get(req.rid) is req:
            del q[req.rid]
        req.in_engine = False

    def fail(self, model: str) -> list[TurnRequest]:
        """``model`` cannot be served here (its switch failed, the engine
        closed): its requests, which the driver ends with an error."""
        return list(self.queues.pop(model, {}).values())

    def leave(self, model: str) -> list[TurnRequest]:
        """``model`` leaves the device: its requests, to be ended by the driver."""
        reqs = list(self.queues.pop(model, {}).values())
        if model in self.order:
            self.order.remove(model)
        return reqs

    def switched(self, model: str, took_s: float) -> None:
        """``model``'s weights went into the engine in ``took_s``."""
        est = self.est.setdefault(model, Estimate())
        self.totals.switches += 1
        self.totals.swap_s += took_s
        if est.switch_s is None:
            est.switch_s = took_s  # a first guess, before any re-prefill is seen

    # ------------------------------------------------------------- decisions
    def busy(self) -> bool:
        """Does any request wait or run?"""
        return any(self.queues.values())

    def has_work(self, model: str) -> bool:
        return bool(self.queues.get(model))

    def pick(self, now: float) -> str | None:
        """The model that gets the free device now (None: nothing to do)."""
        model = self._pick(now)
        if self.log is not None:
            self.log.append(("pick", now, model))
        return model

    def _pick(self, now: float) -> str | None:
        busy = [m for m in self.order if self.queues.get(m)]
        if not busy:
            return None
        if self.config.discipline == REQUEST:  # the model of the oldest request
            return min(busy, key=lambda m: (min(r.arrived for r in self.queues[m].values()), m))
        if self.config.discipline == TOKEN:
            nxt, self.next = self.next, None
            return nxt if nxt in busy else self._next_model(None, now)
        starved = [m for m in busy if m != self.last and not self._has_new(m)
                   and now - self._est(m).last_turn_end > 2 * self.round_s > 0]
        if starved:
            return min(starved, key=lambda m: (self._est(m).last_turn_end, m))
        new = [m for m in busy if self._has_new(m)]
        if new:
            return min(new, key=lambda m: min(r.arrived for r in self.queues[m].values()
                                              if r.new))
        i = self.order.index(self.last) if self.last in self.order else -1
        ring = self.order[i + 1:] + self.order[:i + 1]
        return next(m for m in ring if m in busy)

    def begin(self, model: str, t0: float, now: float) -> list[TurnRequest]:
        """``model``'s turn starts (its weights are in the engine): the
        requests to start, its queued and preempted ones. ``t0``: when the
        driver took the device for it, before any switch."""
        self.est.setdefault(model, Estimate())
        self.current, self.last = model, model
        self.turn_started, self.turn_first = now, None
        queue = self.queues[model]
        resumed = any(not r.new for r in queue.values())
        turn = self._turn = _Turn(model, t0, self.config.discipline, resumed)
        start = list(queue.values())
        for req in start:
            self._start(req)
        if turn.discipline != TOKEN:
            turn.quota_s = self.est[model].quota_s = self._quota(model)
            turn.deadline = now + turn.quota_s
        if self.log is not None:
            self.log.append(("begin", now, model, tuple(r.rid for r in start)))
        return start

    def judge(self, now: float) -> Keep | EndTurn:
        """Does the running turn go on? Judged at its start, at every arrival
        and departure, and when the last ``Keep.wait_s`` runs out."""
        verdict = self._judge(now)
        if self.log is not None:
            self.log.append(("judge", now, verdict))
        return verdict

    def _judge(self, now: float) -> Keep | EndTurn:
        turn = self._turn
        if not self.queues.get(turn.model):
            return EndTurn()
        others = self._others_waiting(turn.model)
        if turn.discipline == TOKEN:
            # Re-judged every min_quota_s while others wait; never before it.
            if others and not self._unfinished_start(turn.model) and \
                    now - self.turn_started >= self.config.min_quota_s:
                nxt = self._next_model(turn.model, now)
                if nxt is not None:
                    self.next = nxt
                    return EndTurn(nxt)
            return Keep(self.config.min_quota_s if others else None)
        if math.isinf(turn.deadline) and others:
            # It was alone when its turn began; now others wait.
            turn.quota_s = self.est[turn.model].quota_s = self._quota(turn.model)
            turn.deadline = now + turn.quota_s
        if now >= turn.deadline:
            if self._unfinished_start(turn.model):
                return Keep(self.config.min_quota_s)  # the quota is up: end once it moved
            if others:
                return EndTurn()
            turn.deadline = now + turn.quota_s  # alone: keep going, no pointless switch
        return Keep(None if math.isinf(turn.deadline) else max(0.0, turn.deadline - now))

    def _unfinished_start(self, model: str) -> bool:
        """Has a request this turn started had no output yet (its prefill or
        re-prefill still running)? Then the turn may not end: see the
        invariants."""
        return any(r.in_engine and r.seg_prev_at is None
                   for r in self.queues.get(model, {}).values())

    def preempt(self) -> list[TurnRequest]:
        """The turn ends: the requests to take out of the engine (each keeps
        the tokens it has delivered and resumes in a later turn)."""
        reqs = [r for r in self.queues.get(self.current, {}).values() if r.in_engine]
        for r in reqs:
            r.in_engine = False
        self.totals.preemptions += len(reqs)
        if self.log is not None:
            self.log.append(("preempt", tuple(r.rid for r in reqs)))
        return reqs

    def close(self, now: float) -> None:
        """The turn is over (its requests are out of the engine) at ``now``:
        learn the switch cost, free the device."""
        turn, est = self._turn, self.est.setdefault(self.current, Estimate())
        if turn.resumed and self.turn_first is not None:
            est.switch_s = ewma(est.switch_s, self.turn_first - turn.t0)
            self.totals.restart_s += self.turn_first - self.turn_started
        est.last_turn_end = now
        self.totals.busy_s += now - turn.t0
        self.current, self._turn = None, None

    def quiet_s(self, now: float) -> float:
        """A "token" turn: how long, as laxities stand now, before ``judge``
        could end it if nothing arrived or left (0: it may end now). Only a
        hint, for a driver that would rather not judge every
        ``min_quota_s`` (the simulator): the running model's laxity is
        taken as it stands, although its measured step still moves."""
        turn = self._turn
        if turn is None or turn.discipline != TOKEN or not self._others_waiting(turn.model):
            return 0.0 if turn is None else math.inf
        gate = max(0.0, self.turn_started + self.config.min_quota_s - now)
        cur, others, knobs = self._next_model_args(turn.model, now)
        return max(gate, quiet_s(cur, others, **knobs))

    # ------------------------------------------------------------- stats
    def counts(self, model: str) -> tuple[int, int, int]:
        """``model``'s requests: (queued, in the engine, preempted)."""
        q = list(self.queues.get(model, {}).values())
        return (sum(1 for r in q if not r.in_engine), sum(1 for r in q if r.in_engine),
                sum(1 for r in q if not r.in_engine and not r.new))

    # ------------------------------------------------------------- internals
    def _start(self, req: TurnRequest) -> None:
        req.in_engine = True

    def _est(self, model: str) -> Estimate:
        """``model``'s estimates, read only (a blank one if none yet)."""
        return self.est.get(model, Estimate())

    def _has_new(self, model: str) -> bool:
        return any(r.new for r in self.queues.get(model, {}).values())

    def _others_waiting(self, model: str) -> bool:
        return any(q for m, q in self.queues.items() if m != model)

    def _next_model(self, current: str | None, now: float) -> str | None:
        cur, others, knobs = self._next_model_args(current, now)
        return next_model(cur, others, **knobs)

    def _next_model_args(self, current: str | None,
                         now: float) -> tuple[ModelSlack | None, list[ModelSlack], dict]:
        busy = [m for m in self.order if self.queues.get(m) and m != current]
        step = max((e.step_s for e in self.est.values() if e.step_s),
                   default=self.config.default_step_s)
        cur = self._slack(current, now, waiting=False) if current is not None else None
        knobs = dict(
            # Turns are re-judged every min_quota_s: a model must be called
            # while it still has that much slack, plus two steps of error.
            margin_s=self.config.min_quota_s + 2 * step,
            # Turns of about this length keep switching under 1/SWITCH_SHARE of the time.
            hysteresis_s=max(self.config.min_quota_s,
                             SWITCH_SHARE * self._known_mean("switch_s")),
            prefill_turn_s=2 * self._known_mean("switch_s") + self.config.min_quota_s,
            starve_s=self.config.max_round_s, capacity=1 - 1 / SWITCH_SHARE)
        return cur, [self._slack(m, now) for m in busy], knobs

    def _slack(self, model: str, now: float, waiting: bool = True) -> ModelSlack:
        ttft_slo, tpot_slo = self._slo(model)
        e = self._est(model)
        step = self._step(model)
        switch = e.switch_s or self._known_mean("switch_s")
        reqs = list(self.queues.get(model, {}).values())
        lax = [laxity(RequestTiming(r.arrived, r.first_at, r.generated, r.max_tokens),
                      now, ttft_slo, tpot_slo, step, switch) for r in reqs]
        oldest = min((r.arrived for r in reqs), default=now)
        waited = now - max(oldest, e.last_turn_end) if waiting else 0.0
        return summarize(model, lax, any(r.new for r in reqs), waited,
                         decoding=any(r.first_at is not None for r in reqs),
                         share=step / tpot_slo)

    def _step(self, model: str) -> float:
        """``model``'s decode step; before it is measured, its family's (the
        models here share one architecture), and only then the default."""
        e = self.est.get(model)
        if e is not None and e.step_s:
            return e.step_s
        return self._known_mean("step_s") or self.config.default_step_s

    def _known_mean(self, attr: str, models: list[str] | None = None) -> float:
        """Mean of the measured ``attr`` ("step_s", "switch_s") over
        ``models`` (default: all); 0.0 while none is measured."""
        known = [v for m, e in self.est.items()
                 if (models is None or m in models) and (v := getattr(e, attr))]
        return sum(known) / len(known) if known else 0.0

    def _quota(self, model: str) -> float:
        """This turn's time quota for ``model`` (``policies/quota.py``), from
        the measured step times and switch costs of the models with work."""
        if self.config.discipline == REQUEST:
            return math.inf
        busy = [m for m in self.order if self.queues.get(m)]
        if len(busy) < 2:
            return math.inf  # alone: never preempted (re-checked as others arrive)
        guess = self._known_mean("switch_s", busy)  # for models not yet measured
        if not guess:  # nothing measured yet: switch soon and learn the cost
            return self.config.min_quota_s
        step = {m: self._step(m) for m in busy}
        switch = sum(self._est(m).switch_s or guess for m in busy)
        q = decode_quotas({m: self._slo(m)[1] for m in busy}, step, switch,
                          self.config.slo_fraction, self.config.max_round_s)
        self.round_s = q.round_s
        return min(max(q.quota_s[model], self.config.min_quota_s), self.config.max_round_s)
