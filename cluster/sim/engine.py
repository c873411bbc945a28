"""One simulated engine: the turn machine's second driver.

An engine serves one family's models on one device. Time-shared, its
members take turns decided by ``policies/turns.py``, exactly as the engine
worker's ``TimeShareScheduler`` runs them; a dedicated engine is the same
with one member (the ``request`` discipline never preempts a model alone).

The driver has two halves:

- **turn glue** (``arrive``, ``on_output``, ``on_finish``, ``on_switch_done``,
  ``on_tick``): what happens becomes the machine's events, and its decisions
  are carried out: the same calls, in the same order, as the live driver's
  ``_add``, ``_output``, ``_finished``, ``_turn`` and ``_once``;
- **work** (``_plan``, ``_advance``): a cost model turns the batch into time.
  One activity at a time: a weight switch (on the host link), a prefill of
  the requests a turn started (new ones, and resumed ones re-prefilling
  prompt + delivered tokens: a preempted request's KV cache is dropped), or
  decode steps of the running batch. Prefill goes first. Decode advances in
  runs of steps up to the next thing that changes (a request finishing, a
  judgement, an arrival), not one event per token. Requests are admitted
  while their KV cache (prompt + whole output, reserved up front) fits.

Engines on one device share it (``SimDevice``): k engines computing at once
each run at 1/k speed; switches share the host link alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from policies.turns import REQUEST, TOKEN, EndTurn, TurnConfig, TurnMachine, TurnRequest

from cluster.sim.costmodel import CostModel, Switch
from cluster.sim.profiles import ModelProfile

if TYPE_CHECKING:
    from cluster.sim.device import SimDevice

MAX_SEQS = 256  # vLLM's default max_num_seqs: requests in one batch
# A "token" turn is judged every min_quota_s live; the simulator judges at
# half the time the machine says nothing can change (TurnMachine.quiet_s),
# never sooner than min_quota_s and never later than this.
MAX_JUDGE_GAP_S = 1.0
_EPS = 1e-9
SINGLE = TurnConfig(discipline=REQUEST)  # a dedicated engine: one model, never preempted


@dataclass(eq=False)
class SimRequest(TurnRequest):
    """A request as the machine sees it, plus what the simulator tracks."""

    prompt_tokens: int = 0
    index: int = -1  # its row in the run's results
    kv_tokens: int = 0  # KV cache reserved for it while in the batch
    # When it reached the engine it finished on, and with how many tokens: the
    # worker's own latency estimates start there, as live (a cold-start wait
    # happens before a request reaches any worker).
    reached_at: float = 0.0
    reached_with: int = 0


IDLE, SWITCHING, TURN = "idle", "switching", "turn"
PREFILL, DECODE = "prefill", "decode"


class SimEngine:
    def __init__(self, sim, device: "SimDevice", eid: str, family: str,
                 cost: CostModel, config: TurnConfig, slo, reserve_bytes: int,
                 kv_capacity_tokens: int, ready_at: float, timeshared: bool):
        self.sim, self.device, self.id, self.family = sim, device, eid, family
        self.cost = cost
        self.machine = TurnMachine(config, slo)
        self.reserve_bytes = reserve_bytes  # device memory it holds
        self.kv_capacity_tokens = kv_capacity_tokens
        self.ready_at = ready_at  # before this it is still starting
        self.timeshared = timeshared
        self.members: dict[str, ModelProfile] = {}
        self.resident: str | None = None  # whose weights are in it
        self.state = IDLE
        self.closed = False
        self.running: list[SimRequest] = []  # in the batch
        self.pending: list[SimRequest] = []  # started by a turn, waiting for their prefill
        self.kv_used = 0
        # The current activity: None, SWITCHING's link work, PREFILL or DECODE.
        self.act: str | None = None
        self.rate = 1.0  # its share of the device (or link) while it works
        self._t = 0.0  # progress counted up to here
        self._left_s = 0.0  # full-speed work left (switch, prefill)
        self._step_s = 0.0  # one decode step at full speed
        self._steps = 0.0  # decode steps done since the last delivery
        self._prefilling: list[SimRequest] = []
        self._switch_to: str | None = None
        self._t0 = 0.0  # when the device was taken for the current turn
        self._work_v = 0
        self._tick_v = 0
        # Judge a "token" turn less often while the machine says nothing can
        # change (see MAX_JUDGE_GAP_S); off, it is judged every min_quota_s as live.
        self.skip_judgements = True
        # Set to a list to record what happened (outputs per engine segment,
        # switches): the live-vs-simulator test replays it into the live driver.
        self.record: list[tuple] | None = None

    # ------------------------------------------------------------ membership
    @property
    def ready(self) -> bool:
        return not self.closed and self.sim.q.now >= self.ready_at

    def inflight(self, model: str) -> int:
        return len(self.machine.queues.get(model, ()))

    def load_done(self, now: float) -> None:
        """The engine finished starting (its founding model is resident)."""
        self._kick(now)

    def remove(self, model: str, now: float) -> list[SimRequest]:
        """``model`` leaves the engine now: its turn (if running) ends first;
        its requests are returned for the cluster to resume elsewhere."""
        self._advance(now)
        if self.machine.current == model:
            self._end_turn(now, pick_next=False)
        reqs = [r for r in self.machine.leave(model) if isinstance(r, SimRequest)]
        self.members.pop(model, None)
        if self.resident == model:
            self.resident = None
        self._kick(now)
        return reqs

    def close(self, now: float) -> list[SimRequest]:
        """The engine goes away: every member's requests come back."""
        self.closed = True  # no new turn starts while its members leave
        out = []
        for model in list(self.members):
            out += self.remove(model, now)
        self._stop_work(now)
        self._work_v += 1
        self._tick_v += 1
        return out

    # ------------------------------------------------------------ turn glue
    def arrive(self, req: SimRequest, now: float) -> None:
        """A request routed here (new, or resumed from another copy)."""
        self._advance(now)
        req.reached_at, req.reached_with = now, req.generated
        if self.machine.arrive(req):
            self._segment(req)
        if self.state == TURN:
            self._judge(now)
        self._kick(now)

    def on_output(self, req: SimRequest, tokens: int, now: float) -> None:
        if self.record is not None:
            self.record.append(("output", f"{req.rid}~{req.segments - 1}", now, tokens))
        self.machine.delivered(req, tokens, now)
        if req.generated >= req.max_tokens:
            self.on_finish(req, now)

    def on_finish(self, req: SimRequest, now: float) -> None:
        if req in self.running:
            self.running.remove(req)
        self.kv_used -= req.kv_tokens
        req.kv_tokens = 0
        self.machine.drop(req)
        self.sim.finished(req, self, now)

    def on_switch_done(self, now: float) -> None:
        model, self._switch_to = self._switch_to, None
        if self.record is not None:
            self.record.append(("switch", model, now, now - self._t0))
        self.machine.switched(model, now - self._t0)
        self.resident = model
        self.state = IDLE
        if self.machine.has_work(model):
            self._begin(model, now)
        else:  # its requests left during the switch
            self._next_turn(now)

    def on_tick(self, version: int) -> None:
        """A judgement falls due (the live driver's sleep timed out)."""
        if version != self._tick_v or self.state != TURN or self.closed:
            return
        now = self.sim.q.now
        self._advance(now)
        if self.state == TURN:
            self._judge(now)
        self._plan(now)

    # ------------------------------------------------------------ turns
    def _kick(self, now: float) -> None:
        """Start a turn if the engine is free, then set the work going."""
        if self.state == IDLE and self.ready:
            self._next_turn(now)
        self._plan(now)

    def _next_turn(self, now: float) -> None:
        model = self.machine.pick(now)
        if model is None:
            return
        self._t0 = now
        if self.resident != model:
            self.state, self._switch_to = SWITCHING, model
            self._start_work(Switch.IN_PLACE, now)
        else:
            self._begin(model, now)

    def _begin(self, model: str, now: float) -> None:
        self.state = TURN
        for req in self.machine.begin(model, self._t0, now):
            self._segment(req)
        self._judge(now)

    def _segment(self, req: TurnRequest) -> None:
        """The machine started ``req``: a new engine segment, queued for prefill."""
        self.machine.segment_started(req)
        self.pending.append(req)

    def _judge(self, now: float) -> None:
        verdict = self.machine.judge(now)
        if isinstance(verdict, EndTurn):
            self._end_turn(now)
            return
        self._tick_v += 1
        wait = verdict.wait_s
        if self.skip_judgements and self.machine.config.discipline == TOKEN and \
                wait is not None:
            quiet = self.machine.quiet_s(now)
            if quiet > 2 * wait:  # nothing can change for a while: judge less often
                wait = min(max(wait, quiet / 2), MAX_JUDGE_GAP_S)
        if wait is not None:
            self.sim.q.at(now + wait, self.on_tick, self._tick_v)

    def _end_turn(self, now: float, pick_next: bool = True) -> None:
        self._tick_v += 1
        for req in self.machine.preempt():
            self._evict(req)
        self.machine.close(now)
        self.state = IDLE
        if self.act in (PREFILL, DECODE):
            self._stop_work(now)
        if pick_next:
            self._next_turn(now)

    def _evict(self, req: SimRequest) -> None:
        """Out of the engine: its KV cache is dropped (re-prefilled on resume)."""
        for bucket in (self.running, self.pending, self._prefilling):
            if req in bucket:
                bucket.remove(req)
        self.kv_used -= req.kv_tokens
        req.kv_tokens = 0

    # ------------------------------------------------------------ work
    def _profile(self) -> ModelProfile:
        return self.sim.profile(self.resident)

    def _plan(self, now: float) -> None:
        """Choose the next activity and schedule its end."""
        if self.closed or self.act == Switch.IN_PLACE or self.state != TURN:
            return
        if self.act == DECODE:
            self._progress(now)
            if self.pending and self._admissible():  # prefill first: decoding pauses
                self._stop_work(now)
        if self.act is None and self.pending:
            batch = self._admit()
            if batch:
                self._prefilling = batch
                self._left_s = self.cost.prefill_s(self._profile(),
                                                   [r.prompt_tokens + r.generated for r in batch])
                self._start_work(PREFILL, now)
                return
        if self.act is None and self.running:
            self._start_work(DECODE, now)
        elif self.act == DECODE:
            self._schedule(now)

    def _admissible(self) -> bool:
        req = self.pending[0]
        return len(self.running) < MAX_SEQS and \
            self.kv_used + req.prompt_tokens + req.max_tokens <= self.kv_capacity_tokens

    def _admit(self) -> list[SimRequest]:
        batch = []
        for req in list(self.pending):
            need = req.prompt_tokens + req.max_tokens
            room = self.kv_used + need <= self.kv_capacity_tokens or not (self.running or batch)
            if not room or len(self.running) + len(batch) >= MAX_SEQS:
                break
            self.pending.remove(req)
            req.kv_tokens = need
            self.kv_used += need
            batch.append(req)
        return batch

    def _start_work(self, act, now: float) -> None:
        self.act, self._t = act, now
        if act is Switch.IN_PLACE:
            self._left_s = self.cost.switch_s(self.sim.profile(self._switch_to), Switch.IN_PLACE)
        elif act == DECODE:
            self._steps = 0.0
            self._set_step()
        self.device.join(self, "link" if act is Switch.IN_PLACE else "compute", now)

    def _stop_work(self, now: float) -> None:
        if self.act is None:
            return
        resource = "link" if self.act is Switch.IN_PLACE else "compute"
        for req in self._prefilling:  # a prefill cut short: its KV never came to be
            self.pending.insert(0, req)
            self.kv_used -= req.kv_tokens
            req.kv_tokens = 0
        self._prefilling = []
        self.act = None
        self._work_v += 1
        self.device.leave(self, resource, now)

    def _set_step(self) -> None:
        ctx = sum(r.prompt_tokens + r.generated for r in self.running)
        self._step_s = self.cost.decode_step_s(self._profile(), len(self.running), ctx)

    def resync(self, now: float, rate: float) -> None:
        """The device's share changed: count progress at the old rate, go on at the new."""
        self._progress(now)
        self.rate = rate
        self._schedule(now)

    def _progress(self, now: float) -> None:
        done = (now - self._t) * self.rate
        self._t = now
        if self.act == DECODE:
            self._steps += done / self._step_s
        else:
            self._left_s -= done

    def _schedule(self, now: float) -> None:
        self._work_v += 1
        if self.act == DECODE:
            if not self.running:
                return
            left = min(r.max_tokens - r.generated for r in self.running) - self._steps
            when = now + max(0.0, left) * self._step_s / self.rate
        else:
            when = now + max(0.0, self._left_s) / self.rate
        self.sim.q.at(when, self._on_work, self._work_v)

    def _on_work(self, version: int) -> None:
        if version != self._work_v or self.closed:
            return
        now = self.sim.q.now
        if self.act is Switch.IN_PLACE:
            self._progress(now)
            self._stop_work(now)
            self.on_switch_done(now)
            self._plan(now)
            return
        woke = self._advance(now)
        if woke and self.state == TURN:
            self._judge(now)
        self._plan(now)

    def _advance(self, now: float) -> bool:
        """Count the work done up to ``now`` and deliver its tokens. True if a
        request finished (a departure: the turn is judged again)."""
        if self.act not in (PREFILL, DECODE):
            return False
        self._progress(now)
        finished = False
        if self.act == PREFILL and self._left_s <= _EPS:
            batch, self._prefilling = self._prefilling, []
            self._stop_work(now)
            for req in batch:
                self.running.append(req)
                self.on_output(req, 1, now)  # prefill ends with the next token
                finished |= req.generated >= req.max_tokens
        elif self.act == DECODE:
            steps = int(self._steps + _EPS)
            if steps:
                self._steps = max(0.0, self._steps - steps)
                for req in list(self.running):
                    n = min(steps, req.max_tokens - req.generated)
                    self.on_output(req, n, now)
                    finished |= req.generated >= req.max_tokens
                if self.running:
                    self._set_step()  # the batch's context grew
                else:
                    self._stop_work(now)
        return finished
