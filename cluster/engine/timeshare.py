"""Token-level time-sharing: same-family models take turns on one engine shell.

A request-level system switches models only between requests, so one model's
long generation blocks every other model sharing the device. Aegaeon (SOSP'25)
switches between decode steps instead. This module does that on stock vLLM,
inside the engine worker, for the models of one family on one device:

- **Turns.** One model at a time owns the shell. Its requests (new ones and
  preempted ones) run as one continuous batch until the turn ends.
- **Preempt.** At the end of the turn each of its engine requests is
  cancelled (vLLM aborts it). A request keeps every token it has delivered;
  tokens vLLM computed but had not delivered are dropped and recomputed.
- **Switch.** The next model's weights go into the same engine in place
  (``EngineShell.swap_in``: a prepared swap of milliseconds on CPU, a reload
  on GPU), which also resets the prefix cache.
- **Resume.** Each preempted request continues as a new engine request on
  prompt + delivered tokens (re-prefill) for the rest of its ``max_tokens``.
  With greedy sampling the concatenation equals a dedicated run's output, as
  for migration (``cluster/engine/request_stream.py``). Seeded random sampling
  restarts its RNG stream at each resume: valid output, not identical.

Disciplines (``TimeshareConfig.discipline``):

- ``token`` (default): a model keeps the device until another model's
  requests run out of SLO slack, or a new request elsewhere can be
  prefilled without putting the running ones at risk (prefill first, for
  TTFT). Slack comes from each model's TTFT and TPOT SLOs, its measured
  step time and the measured switch cost (``policies/slack.py``). A model
  joins the rotation only while the decoding models' TPOT needs fit the
  device (admission); otherwise its new requests wait on TTFT slack.
- ``aegaeon``: Aegaeon's fixed decode quotas (``policies/quota.py``), which
  aim each model's average TPOT at a fraction of its SLO; prefill first,
  then round-robin, a model left waiting two rounds goes first. Step times
  and switch costs are measured online, and a switch costs the re-prefill
  of the preempted requests too, not only the weight copy.
- ``request``: for comparison, a model keeps the device until it has no
  request left, then the model of the oldest request goes next.

A model alone on the device is never preempted. A switch's cost is
measured as swap plus re-prefill, until the first resumed token.

OpenAI-layer requests (vLLM's serving state lives in the engine) cannot be
preempted: they hold an exclusive lease, the model's turn lasts until they
finish, and the token-level requests of other models wait.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from cluster.catalog import TimeshareConfig
from cluster.engine.contract import GroupStats, TurnStats
from cluster.errors import ModelNotActiveError
from policies.smoothing import ewma
from policies.quota import decode_quotas
from policies.slack import ModelSlack, RequestTiming, laxity, next_model, summarize

log = logging.getLogger(__name__)

TOKEN, AEGAEON, REQUEST = "token", "aegaeon", "request"
_END = object()  # ends a request's output queue
SWITCH_SHARE = 8  # "token": turns last ~8 switch costs


@dataclass(eq=False)
class _Req:
    rid: str
    model: str
    prompt_ids: list[int]
    params: Any  # vLLM SamplingParams (DELTA) for the whole request
    arrived: float
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)  # delivered so far
    pump: asyncio.Task | None = None  # its engine request, while in the device
    segments: int = 0  # engine requests it has had (1 + resumes)
    first_at: float | None = None  # its first token
    lease: asyncio.Event | None = None  # an exclusive lease, not a request

    @property
    def new(self) -> bool:
        """Never run yet: waiting for its prefill."""
        return self.segments == 0


@dataclass
class _Estimate:
    step_s: float | None = None  # decode step time of the model's batch
    switch_s: float | None = None  # swap + re-prefill until its first token after a switch
    quota_s: float = 0.0  # last quota given
    last_turn_end: float = 0.0


class TimeShareScheduler:
    """Runs the turns of the models sharing ``shell``.

    ``switch(model)`` puts ``model``'s weights into the shell and returns the
    seconds it took (the worker's swap, which keeps its registry right);
    ``slo(model)`` gives the model's (TTFT, TPOT) targets.
    """

    def __init__(self, shell, switch: Callable[[str], Awaitable[float]],
                 slo: Callable[[str], tuple[float, float]], config: TimeshareConfig):
        self.shell = shell
        self.cfg = config
        self._switch = switch
        self._slo = slo
        self._next: str | None = None  # chosen when the last turn ended
        self.queues: dict[str, dict[str, _Req]] = {}  # model -> request id -> request
        self.est: dict[str, _Estimate] = {}
        self.current: str | None = None  # model whose turn it is
        self._order: list[str] = []  # round-robin order: models by first arrival
        self._last: str | None = None
        self._holds: Counter[str] = Counter()  # exclusive leases held per model
        self._round_s = 0.0
        self._wake = asyncio.Event()
        self._device = asyncio.Lock()  # held for a turn, a switch or a prepare
        self._turn_started = 0.0
        self._turn_first: float | None = None  # first resumed token of this turn
        # Totals for stats and the benchmark.
        self.switches = 0
        self.swap_s = 0.0  # weight swaps
        self.restart_s = 0.0  # after a swap, until the first resumed token
        self.busy_s = 0.0  # turns, switches included
        self.preemptions = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    # ------------------------------------------------------------- requests
    def lane(self, model: str, model_path: str) -> "Lane":
        return Lane(self, model, model_path)

    async def generate(self, model: str, prompt_ids: list[int], params: Any,
                       request_id: str) -> AsyncIterator[Any]:
        """vLLM-shaped delta outputs of one request, however often it is preempted."""
        req = _Req(request_id, model, list(prompt_ids), params, time.monotonic())
        self._add(req)
        try:
            while (item := await req.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._drop(req)

    def abort(self, request_id: str) -> bool:
        """End a request's stream now (it is aborted or moved by the worker)."""
        for q in self.queues.values():
            req = q.get(request_id)
            if req is not None:
                req.out.put_nowait(_END)
                self._drop(req)
                return True
        return False

    @asynccontextmanager
    async def exclusive(self, model: str):
        """Hold ``model`` on the device, unpreempted, for the ``with`` body."""
        lease = _Req(f"lease-{id(object())}", model, [], None, time.monotonic(),
                     lease=asyncio.Event())
        self._holds[model] += 1
        self._add(lease)
        try:
            await lease.lease.wait()
            if self.current != model:  # its turn failed (see ``_fail``)
                raise ModelNotActiveError(f"model {model!r} could not get the device")
            yield
        finally:
            self._holds[model] -= 1
            self._drop(lease)

    async def prepare(self, model: str) -> None:
        """Switch to ``model`` now if the device is idle: a model joining the
        group is read into the host cache and, on CPU, kept prepared in the
        engine, so its first real turn is a fast swap (prefetch)."""
        if self._device.locked() or any(self.queues.values()):
            return  # busy: its first turn will reload it instead
        async with self._device:
            if self.shell.resident != model:
                await self._switch(model)

    async def leave(self, model: str) -> None:
        """``model`` is leaving the group (its requests already ended): wait
        out its turn, and make sure its weights are never reused by name."""
        async with self._device:
            for req in list(self.queues.pop(model, {}).values()):
                req.out.put_nowait(ModelNotActiveError(f"model {model!r} left the device"))
            if model in self._order:
                self._order.remove(model)
            if self.shell.resident == model:
                self.shell.resident = None

    def close(self) -> None:
        self._task.cancel()
        for model in list(self.queues):
            self._fail(model, ModelNotActiveError(f"model {model!r}: its engine was shut down"))

    def model_stats(self, model: str) -> TurnStats:
        """Its requests by where they are, and its estimates."""
        q = [r for r in self.queues.get(model, {}).values() if r.lease is None]
        e = self.est.get(model, _Estimate())
        return TurnStats(queued=sum(1 for r in q if r.pump is None),
                         in_engine=sum(1 for r in q if r.pump is not None),
                         preempted=sum(1 for r in q if r.pump is None and not r.new),
                         step_s=e.step_s, switch_s=e.switch_s, quota_s=e.quota_s)

    def stats(self) -> GroupStats:
        return GroupStats(
            discipline=self.cfg.discipline, resident=self.shell.resident, current=self.current,
            switches=self.switches, preemptions=self.preemptions, swap_s=self.swap_s,
            restart_s=self.restart_s, busy_s=self.busy_s,
            models={m: self.model_stats(m) for m in sorted(set(self.queues) | set(self.est))})

    # ------------------------------------------------------------ internals
    def _add(self, req: _Req) -> None:
        self.queues.setdefault(req.model, {})[req.rid] = req
        if req.model not in self._order:
            self._order.append(req.model)
        if req.model == self.current:
            self._start(req)  # joins the running batch at once
        self._wake.set()

    def _drop(self, req: _Req) -> None:
        q = self.queues.get(req.model, {})
        if q.get(req.rid) is req:
            del q[req.rid]
        if req.pump is not None and not req.pump.done():
            req.pump.cancel()  # vLLM aborts the engine request on cancel
        req.pump = None
        self._wake.set()

    def _start(self, req: _Req) -> None:
        if req.lease is not None:
            req.lease.set()
        elif req.pump is None:
            req.pump = asyncio.get_running_loop().create_task(self._pump(req))

    async def _pump(self, req: _Req) -> None:
        """One engine request for ``req``: from its delivered tokens to the end
        or to the next preemption (cancellation)."""
        done = len(req.tokens)
        params = req.params
        if done:
            params = req.params.clone()
            params.max_tokens = req.params.max_tokens - done
            params.min_tokens = max(0, (req.params.min_tokens or 0) - done)
        seg_id = f"{req.rid}~{req.segments}"  # vLLM may still hold an aborted id
        req.segments += 1
        est = self.est.setdefault(req.model, _Estimate())
        prev = None
        try:
            async for out in self.shell.generate(req.prompt_ids + req.tokens, params, seg_id):
                now = time.monotonic()
                n = len(out.outputs[0].token_ids)
                if prev is None and done and self._turn_first is None:
                    self._turn_first = now
                if prev is not None and n:
                    est.step_s = ewma(est.step_s, (now - prev) / n)
                prev = now
                if req.first_at is None and n:
                    req.first_at = now
                req.tokens.extend(out.outputs[0].token_ids)
                req.out.put_nowait(out)
                if out.finished:
                    req.out.put_nowait(_END)
                    break
            else:
                return  # the engine stream ended unfinished: left to the turn
        except asyncio.CancelledError:
            raise  # preempted or dropped: whoever cancelled it cleans up
        except Exception as e:  # noqa: BLE001 - handed to the request's consumer
            req.out.put_nowait(e)
        req.pump = None  # this task is ending: nothing for _drop to cancel
        self._drop(req)

    async def _run(self) -> None:
        """The device loop. It must outlive any one failure: every request
        on the device waits on it."""
        while True:
            try:
                await self._once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged; the loop goes on
                log.exception("time-sharing: scheduler step failed")
                await asyncio.sleep(0.01)

    async def _once(self) -> None:
        while True:
            model = self._pick()
            if model is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._device:
                if not self.queues.get(model):  # may have emptied while waiting
                    continue
                try:
                    await self._turn(model)
                except Exception as e:  # noqa: BLE001 - e.g. its swap failed
                    log.exception("time-sharing: the turn of %r failed", model)
                    self._fail(model, ModelNotActiveError(
                        f"model {model!r} could not get its turn on the device: "
                        f"{type(e).__name__}: {e}"))

    def _pick(self) -> str | None:
        busy = [m for m in self._order if self.queues.get(m)]
        if not busy:
            return None
        if self.cfg.discipline == REQUEST:  # the model of the oldest request
            return min(busy, key=lambda m: (min(r.arrived for r in self.queues[m].values()), m))
        now = time.monotonic()
        if self.cfg.discipline == TOKEN:
            nxt, self._next = self._next, None
            return nxt if nxt in busy else self._next_model(None, now)
        starved = [m for m in busy if m != self._last and not self._has_new(m)
                   and now - self.est.get(m, _Estimate()).last_turn_end > 2 * self._round_s > 0]
        if starved:
            return min(starved, key=lambda m: (self.est.get(m, _Estimate()).last_turn_end, m))
        new = [m for m in busy if self._has_new(m)]
        if new:
            return min(new, key=lambda m: min(r.arrived for r in self.queues[m].values()
                                              if r.new))
        i = self._order.index(self._last) if self._last in self._order else -1
        ring = self._order[i + 1:] + self._order[:i + 1]
        return next(m for m in ring if m in busy)

    def _fail(self, model: str, error: Exception) -> None:
        for req in list(self.queues.pop(model, {}).values()):
            if req.pump is not None:
                req.pump.cancel()
            if req.lease is not None:
                req.lease.set()  # the holder then finds the model not served
            req.out.put_nowait(error)

    def _has_new(self, model: str) -> bool:
        return any(r.new for r in self.queues.get(model, {}).values())

    async def _turn(self, model: str) -> None:
        t0 = time.monotonic()
        est = self.est.setdefault(model, _Estimate())
        if self.shell.resident != model:
            took = await self._switch(model)
            self.switches += 1
            self.swap_s += took
            if est.switch_s is None:
                est.switch_s = took  # a first guess, before any re-prefill is seen
        self.current, self._last = model, model
        self._turn_started, self._turn_first = time.monotonic(), None
        resumed = any(not r.new for r in self.queues[model].values() if r.lease is None)
        for req in list(self.queues[model].values()):
            self._start(req)
        try:
            if self.cfg.discipline == TOKEN:
                await self._slack_turn(model)
            else:
                await self._quota_turn(model, est)
        finally:
            await self._preempt(model)
            end = time.monotonic()
            if resumed and self._turn_first is not None:
                cost = (self._turn_first - self._turn_started) + (self._turn_started - t0)
                est.switch_s = ewma(est.switch_s, cost)
                self.restart_s += self._turn_first - self._turn_started
            est.last_turn_end = end
            self.busy_s += end - t0
            self.current = None

    async def _quota_turn(self, model: str, est: _Estimate) -> None:
        """``aegaeon``: a fixed quota per turn; ``request``: until done."""
        quota = est.quota_s = self._quota(model)
        deadline = time.monotonic() + quota
        while self.queues.get(model):
            now = time.monotonic()
            if math.isinf(deadline) and self._others_waiting(model):
                # It was alone when its turn began; now others wait.
                quota = est.quota_s = self._quota(model)
                deadline = now + quota
            if now >= deadline and not self._holds[model]:
                if self._others_waiting(model):
                    return
                deadline = now + quota  # alone: keep going, no pointless switch
            await self._sleep(None if math.isinf(deadline) else max(0.0, deadline - now))

    async def _slack_turn(self, model: str) -> None:
        """``token``: until another model must start or can be prefilled
        (``policies/slack.py``), re-judged every ``min_quota_s``."""
        started = time.monotonic()
        while self.queues.get(model):
            now = time.monotonic()
            others = self._others_waiting(model)
            if others and not self._holds[model] and now - started >= self.cfg.min_quota_s:
                nxt = self._next_model(model, now)
                if nxt is not None:
                    self._next = nxt
                    return
            await self._sleep(self.cfg.min_quota_s if others else None)

    async def _sleep(self, timeout: float | None) -> None:
        """Until something changes (a request comes, ends or leaves) or ``timeout``."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _next_model(self, current: str | None, now: float) -> str | None:
        busy = [m for m in self._order if self.queues.get(m) and m != current]
        step = max((e.step_s for e in self.est.values() if e.step_s),
                   default=self.cfg.default_step_s)
        return next_model(
            self._slack(current, now, waiting=False) if current is not None else None,
            # Turns are re-judged every min_quota_s: a model must be called
            # while it still has that much slack, plus two steps of error.
            [self._slack(m, now) for m in busy], margin_s=self.cfg.min_quota_s + 2 * step,
            # Turns of about this length keep switching under 1/SWITCH_SHARE of the time.
            hysteresis_s=max(self.cfg.min_quota_s, SWITCH_SHARE * self._known_mean("switch_s")),
            prefill_turn_s=2 * self._known_mean("switch_s") + self.cfg.min_quota_s,
            starve_s=self.cfg.max_round_s, capacity=1 - 1 / SWITCH_SHARE)

    def _slack(self, model: str, now: float, waiting: bool = True) -> ModelSlack:
        ttft_slo, tpot_slo = self._slo(model)
        e = self.est.get(model, _Estimate())
        step = self._step(model)
        switch = e.switch_s or self._known_mean("switch_s")
        reqs = list(self.queues.get(model, {}).values())
        lax = [laxity(_timing(r), now, ttft_slo, tpot_slo, step, switch) for r in reqs]
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
        return self._known_mean("step_s") or self.cfg.default_step_s

    def _known_mean(self, attr: str, models: list[str] | None = None) -> float:
        """Mean of the measured ``attr`` ("step_s", "switch_s") over
        ``models`` (default: all); 0.0 while none is measured."""
        known = [v for m, e in self.est.items()
                 if (models is None or m in models) and (v := getattr(e, attr))]
        return sum(known) / len(known) if known else 0.0

    async def _preempt(self, model: str) -> None:
        pumps = []
        for req in self.queues.get(model, {}).values():
            if req.pump is not None:
                pumps.append(req.pump)
                req.pump.cancel()
                req.pump = None
        self.preemptions += len(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)

    def _others_waiting(self, model: str) -> bool:
        return any(q for m, q in self.queues.items() if m != model)

    def _quota(self, model: str) -> float:
        """This turn's time quota for ``model`` (``policies/quota.py``), from
        the measured step times and switch costs of the models with work."""
        if self.cfg.discipline == REQUEST:
            return math.inf
        busy = [m for m in self._order if self.queues.get(m)]
        if len(busy) < 2:
            return math.inf  # alone: never preempted (re-checked as others arrive)
        guess = self._known_mean("switch_s", busy)  # for models not yet measured
        if not guess:  # nothing measured yet: switch soon and learn the cost
            return self.cfg.min_quota_s
        step = {m: self._step(m) for m in busy}
        switch = sum(self.est.get(m, _Estimate()).switch_s or guess for m in busy)
        q = decode_quotas({m: self._slo(m)[1] for m in busy}, step, switch,
                          self.cfg.slo_fraction, self.cfg.max_round_s)
        self._round_s = q.round_s
        return min(max(q.quota_s[model], self.cfg.min_quota_s), self.cfg.max_round_s)


def _timing(r: _Req) -> RequestTiming:
    max_tokens = r.params.max_tokens if r.params is not None else 1  # a lease: like a prefill
    return RequestTiming(r.arrived, r.first_at, len(r.tokens), max_tokens)


class Lane:
    """One model's view of a time-shared shell: the ``Serving`` interface
    (``cluster/engine/serving.py``) the worker runs requests on."""

    def __init__(self, scheduler: TimeShareScheduler, model: str, model_path: str):
        self.scheduler, self.model, self.model_path = scheduler, model, model_path

    def generate(self, prompt_token_ids: list[int], sampling: Any, request_id: str):
        return self.scheduler.generate(self.model, prompt_token_ids, sampling, request_id)

    async def abort(self, request_id: str) -> None:
        # The engine knows the request only by its segment ids, which the
        # scheduler cancels: there is nothing to abort there by this id.
        self.scheduler.abort(request_id)

    def tokenize(self, text: str) -> list[int]:
        return self.scheduler.shell.tokenize(text)
