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

Who goes next and when a turn ends is decided by ``policies/turns.py``
(``TurnMachine``), a pure state machine the simulator runs too. This module
is its driver on the wall clock: it turns what happens in the engine into
the machine's events and carries out its decisions (engine requests started
and cancelled, weights switched).

Every request here is preemptible: OpenAI requests keep their state at the
front door (``cluster/gateway/``) and reach the engine as token streams like
any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.catalog import TimeshareConfig
from cluster.engine.contract import GroupStats, TurnStats
from cluster.errors import ModelNotActiveError
from policies.turns import (AEGAEON, REQUEST, SWITCH_SHARE, TOKEN, Estimate, EndTurn,
                            TurnConfig, TurnMachine, TurnRequest)

log = logging.getLogger(__name__)

__all__ = ["AEGAEON", "REQUEST", "SWITCH_SHARE", "TOKEN", "Lane", "TimeShareScheduler",
           "turn_config"]

_END = object()  # ends a request's output queue


@dataclass(eq=False)
class _Req(TurnRequest):
    """A request as the machine sees it, plus what this driver needs for its I/O."""

    prompt_ids: list[int] = field(default_factory=list)
    params: Any = None  # vLLM SamplingParams (DELTA) for the whole request
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)  # delivered so far
    pump: asyncio.Task | None = None  # its engine request, while in the device


def turn_config(config: TimeshareConfig) -> TurnConfig:
    """The catalog's time-sharing config as the turn machine's plain data."""
    return TurnConfig(discipline=config.discipline, slo_fraction=config.slo_fraction,
                      max_round_s=config.max_round_s, min_quota_s=config.min_quota_s,
                      default_step_s=config.default_step_s)


class TimeShareScheduler:
    """Runs the turns of the models sharing ``shell``.

    ``switch(model)`` puts ``model``'s weights into the shell and returns the
    seconds it took (the worker's swap, which keeps its registry right);
    ``slo(model)`` gives the model's (TTFT, TPOT) targets; ``clock`` is the
    clock every event is stamped with (tests pass their own).
    """

    def __init__(self, shell, switch: Callable[[str], Awaitable[float]],
                 slo: Callable[[str], tuple[float, float]], config: TimeshareConfig,
                 clock: Callable[[], float] = time.monotonic):
        self.shell = shell
        self._cfg = config
        self.turns = TurnMachine(turn_config(config), slo)
        self._switch = switch
        self._clock = clock
        self._wake = asyncio.Event()
        self._device = asyncio.Lock()  # held for a turn, a switch or a prepare
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def cfg(self) -> TimeshareConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, config: TimeshareConfig) -> None:
        """Retuned live (the worker's ``set_timeshare``): the next decision uses it."""
        self._cfg = config
        self.turns.config = turn_config(config)

    @property
    def queues(self) -> dict[str, dict[str, TurnRequest]]:
        return self.turns.queues

    @property
    def current(self) -> str | None:
        return self.turns.current

    # ------------------------------------------------------------- requests
    def lane(self, model: str, model_path: str) -> "Lane":
        return Lane(self, model, model_path)

    async def generate(self, model: str, prompt_ids: list[int], params: Any,
                       request_id: str) -> AsyncIterator[Any]:
        """vLLM-shaped delta outputs of one request, however often it is preempted."""
        req = _Req(request_id, model, self._clock(), params.max_tokens,
                   prompt_ids=list(prompt_ids), params=params)
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

    async def prepare(self, model: str) -> None:
        """Switch to ``model`` now if the device is idle: a model joining the
        group is read into the host cache and, on CPU, kept prepared in the
        engine, so its first real turn is a fast swap (prefetch)."""
        if self._device.locked() or self.turns.busy():
            return  # busy: its first turn will reload it instead
        async with self._device:
            if self.shell.resident != model:
                await self._switch(model)

    async def leave(self, model: str) -> None:
        """``model`` is leaving the group (its requests already ended): wait
        out its turn, and make sure its weights are never reused by name."""
        async with self._device:
            for req in self.turns.leave(model):
                req.out.put_nowait(ModelNotActiveError(f"model {model!r} left the device"))
            if self.shell.resident == model:
                self.shell.resident = None

    def close(self) -> None:
        self._task.cancel()
        for model in list(self.queues):
            self._fail(model, ModelNotActiveError(f"model {model!r}: its engine was shut down"))

    def model_stats(self, model: str) -> TurnStats:
        """Its requests by where they are, and its estimates."""
        queued, in_engine, preempted = self.turns.counts(model)
        e = self.turns.est.get(model, Estimate())
        return TurnStats(queued=queued, in_engine=in_engine, preempted=preempted,
                         step_s=e.step_s, switch_s=e.switch_s, quota_s=e.quota_s)

    def stats(self) -> GroupStats:
        t = self.turns.totals
        return GroupStats(
            discipline=self.cfg.discipline, resident=self.shell.resident, current=self.current,
            switches=t.switches, preemptions=t.preemptions, swap_s=t.swap_s,
            restart_s=t.restart_s, busy_s=t.busy_s,
            models={m: self.model_stats(m) for m in sorted(set(self.queues) | set(self.turns.est))})

    # ------------------------------------------------ events into the machine
    def _add(self, req: _Req) -> None:
        if self.turns.arrive(req):
            self._start(req)  # joins the running batch at once
        self._wake.set()

    def _drop(self, req: _Req) -> None:
        self.turns.drop(req)
        if req.pump is not None and not req.pump.done():
            req.pump.cancel()  # vLLM aborts the engine request on cancel
        req.pump = None
        self._wake.set()

    def _output(self, req: _Req, out: Any) -> None:
        """One engine output of ``req``: the machine learns from it, the consumer gets it."""
        self.turns.delivered(req, len(out.outputs[0].token_ids), self._clock())
        req.tokens.extend(out.outputs[0].token_ids)
        req.out.put_nowait(out)

    def _fail(self, model: str, error: Exception) -> None:
        for req in self.turns.fail(model):
            if req.pump is not None:
                req.pump.cancel()
            req.out.put_nowait(error)

    # ------------------------------------------------ decisions carried out
    def _start(self, req: _Req) -> None:
        if req.pump is None:
            req.pump = asyncio.get_running_loop().create_task(self._pump(req))

    def _segment(self, req: _Req) -> tuple[Any, str]:
        """A new engine segment of ``req`` begins: the sampling params for the
        rest of its budget and the segment's engine id."""
        done = len(req.tokens)
        params = req.params
        if done:
            params = req.params.clone()
            params.max_tokens = req.params.max_tokens - done
            params.min_tokens = max(0, (req.params.min_tokens or 0) - done)
        seg_id = f"{req.rid}~{req.segments}"  # vLLM may still hold an aborted id
        self.turns.segment_started(req)
        return params, seg_id

    async def _pump(self, req: _Req) -> None:
        """One engine request for ``req``: from its delivered tokens to the end
        or to the next preemption (cancellation)."""
        params, seg_id = self._segment(req)
        try:
            async for out in self.shell.generate(req.prompt_ids + req.tokens, params, seg_id):
                self._output(req, out)
                if out.finished:
                    break
            else:
                return  # the engine stream ended unfinished: left to the turn
        except asyncio.CancelledError:
            raise  # preempted or dropped: whoever cancelled it cleans up
        except Exception as e:  # noqa: BLE001 - handed to the request's consumer
            req.out.put_nowait(e)
            req.pump = None
            self._drop(req)
            return
        self._finished(req)

    def _finished(self, req: _Req) -> None:
        """``req``'s last output went out: its stream ends, it leaves the machine."""
        req.out.put_nowait(_END)
        req.pump = None  # its engine task is ending: nothing for _drop to cancel
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
            model = self.turns.pick(self._clock())
            if model is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._device:
                if not self.turns.has_work(model):  # may have emptied while waiting
                    continue
                try:
                    await self._turn(model)
                except Exception as e:  # noqa: BLE001 - e.g. its swap failed
                    log.exception("time-sharing: the turn of %r failed", model)
                    self._fail(model, ModelNotActiveError(
                        f"model {model!r} could not get its turn on the device: "
                        f"{type(e).__name__}: {e}"))

    async def _turn(self, model: str) -> None:
        t0 = self._clock()
        if self.shell.resident != model:
            self.turns.switched(model, await self._switch(model))
        for req in self.turns.begin(model, t0, self._clock()):
            self._start(req)
        try:
            while not isinstance(verdict := self.turns.judge(self._clock()), EndTurn):
                await self._sleep(verdict.wait_s)
        finally:
            await self._preempt()
            self.turns.close(self._clock())

    async def _sleep(self, timeout: float | None) -> None:
        """Until something changes (a request comes, ends or leaves) or ``timeout``."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _preempt(self) -> None:
        pumps = []
        for req in self.turns.preempt():
            if req.pump is not None:
                pumps.append(req.pump)
                req.pump.cancel()
                req.pump = None
        await asyncio.gather(*pumps, return_exceptions=True)


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
