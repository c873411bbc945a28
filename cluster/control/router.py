"""The front door's side of the data path: pick a copy, stream, follow moves.

A ``Router`` caches the controller's versioned route table and streams each
request straight from an engine worker (the controller is not on the token
path). It remembers every token it has passed on, so when the copy goes
away mid-stream it can continue the request elsewhere with the worker's
``resume`` (re-prefill of prompt + generated tokens):

- the worker evacuated the model (migration, scale-in, park): the stream
  ends with a ``moved`` chunk;
- the worker died: Ray raises ``RayActorError`` on the stream.

Either way the client sees one stream with no duplicated and no missing
tokens. After ``MAX_HOPS`` moves, or once the model cannot be made active
again, the request fails with a clear error rather than hanging.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Callable

from cluster.control.fleet import is_actor_death
from cluster.errors import ModelNotActiveError, RequestAbortedError, UnknownModelError
from cluster.request_log import request_event

log = logging.getLogger(__name__)

MAX_HOPS = 4
ARRIVAL_FLUSH_S = 1.0  # how often arrivals served from cached routes reach the controller
BACKPRESSURE = 4  # chunks a worker may run ahead of a slow client


class Router:
    def __init__(self, controller=None, resolve_timeout_s: float | None = None,
                 on_resume: Callable[[str, str], None] | None = None):
        self._controller = controller
        # Told (model, cause) each time a request continues on another copy:
        # "moved" (evacuated) or "failed" (its worker died, or the route was stale).
        self.on_resume = on_resume
        self.resolve_timeout_s = resolve_timeout_s
        self.table: dict = {"version": -1, "routes": {}}
        self._rr = itertools.count()
        self._arrivals: dict[str, int] = {}
        self._flushed_at = time.monotonic()
        self.hops = 0  # requests continued on another copy (for stats and tests)

    @property
    def controller(self):
        if self._controller is None:
            from cluster.control.controller import get_controller
            self._controller = get_controller()
        return self._controller

    async def stream(self, model: str, prompt: str | None = None,
                     prompt_token_ids: list[int] | None = None,
                     sampling: dict | None = None,
                     request_id: str | None = None) -> AsyncIterator[dict]:
        """Yield the request's chunks (see ``cluster.engine.request_stream``).
        Logs ``routed`` with the device picked, then ``resumed`` (with the
        cause and the new device) after each move or failure."""
        request_id = request_id or uuid.uuid4().hex
        desc: dict | None = None  # set by the first chunk: what resume needs
        generated: list[int] = []
        avoid: set[str] = set()
        cause = None  # why the last hop ended: "moved" or "failed"
        for hop in range(MAX_HOPS + 1):
            device, worker = await self.pick(model, avoid, arrival=hop == 0, resuming=hop > 0)
            request_event("resumed" if hop else "routed", request_id, model=model, device=device,
                          cause=cause, generated=len(generated) if hop else None)
            if desc is None:
                gen = worker.generate.options(
                    num_returns="streaming", _generator_backpressure_num_objects=BACKPRESSURE,
                ).remote(model, prompt, prompt_token_ids, sampling, request_id)
            else:
                gen = worker.resume.options(
                    num_returns="streaming", _generator_backpressure_num_objects=BACKPRESSURE,
                ).remote(desc, generated)
            finished, cause = False, "moved"
            try:
                async for ref in gen:
                    chunk = await ref
                    desc = desc or chunk.get("request")
                    if chunk.get("moved"):
                        break
                    generated.extend(chunk["token_ids"])
                    finished = chunk["finished"]
                    chunk["num_generated"] = len(generated)
                    yield chunk
                    if finished:
                        return
            except Exception as e:
                cause = "failed"
                await self.on_failure(e, model, device, avoid)
            finally:
                if not finished:
                    cancel_stream(gen)  # the client left, or we moved on: stop that copy
            self.hops += 1
            if self.on_resume is not None:
                self.on_resume(model, cause)
            await self.refresh(force=True)
        request_event("gave_up", request_id, model=model, hops=MAX_HOPS)
        raise RequestAbortedError(f"request {request_id!r} for {model!r} was moved "
                                  f"{MAX_HOPS} times without finishing; giving up")

    async def pick(self, model: str, avoid: set[str] = frozenset(),
                   arrival: bool = True, resuming: bool = False) -> tuple[str, Any]:
        """A copy of ``model`` to send a request to, loading it if cold.

        ``resolve`` counts its own arrivals; ones served from the cached
        table are batched to the controller as demand. ``resuming``: for a
        request already under way (never shed by the cold-start queue)."""
        copies = [c for c in self.table["routes"].get(model, []) if c[0] not in avoid]
        if copies and arrival:
            self._note_arrival(model)
        if not copies:
            table = await _call(self.controller.resolve, model, self.resolve_timeout_s, resuming)
            self._adopt(table)
            copies = [c for c in self.table["routes"].get(model, []) if c[0] not in avoid] \
                or self.table["routes"].get(model, [])
            if not copies:
                raise RequestAbortedError(f"model {model!r} has no active copy after loading")
        device, worker = copies[next(self._rr) % len(copies)]
        return device, worker

    async def on_failure(self, e: Exception, model: str, device: str,
                         avoid: set[str]) -> None:
        """A try on ``device`` failed: re-raise ``e`` unless another copy is
        worth trying. A stale route (the copy is draining or gone) only needs
        fresh routes; a dead worker is avoided and reported to the controller.
        The caller refreshes the routes before the next try."""
        if isinstance(e, (ModelNotActiveError, UnknownModelError)):
            return
        if not is_actor_death(e):
            raise e
        log.warning("worker for %s on %s died; trying another copy", model, device)
        avoid.add(device)
        await self._report_failure(device)

    async def refresh(self, force: bool = False) -> None:
        table = await _call(self.controller.route_table, -1 if force else self.table["version"])
        self._adopt(table)
        await self._flush_arrivals()

    def _adopt(self, table: dict | None) -> None:
        if table is not None and table["version"] >= self.table["version"]:
            self.table = table

    def _note_arrival(self, model: str) -> None:
        self._arrivals[model] = self._arrivals.get(model, 0) + 1
        if time.monotonic() - self._flushed_at >= ARRIVAL_FLUSH_S:
            asyncio.ensure_future(self._flush_arrivals())

    async def _flush_arrivals(self) -> None:
        counts, self._arrivals = self._arrivals, {}
        self._flushed_at = time.monotonic()
        if counts:
            self.controller.note_arrivals.remote(counts)  # fire and forget

    async def _report_failure(self, device: str) -> None:
        try:
            await _call(self.controller.report_failure, device)
        except Exception:  # the controller restarting: its health check will see it
            log.exception("could not report the failure of %s", device)


async def _call(method, *args, attempts: int = 10):
    """Call the controller, riding out a restart of its actor."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    for i in range(attempts):
        try:
            return await method.remote(*args)
        except (RayActorError, ActorUnavailableError):
            if i == attempts - 1:
                raise
            await asyncio.sleep(0.5 * (i + 1))


def cancel_stream(gen) -> None:
    """Stop a worker's stream (its request is aborted inside vLLM)."""
    cancel = getattr(gen, "cancel", None)  # a fake worker's stream stops itself
    if cancel is not None:
        cancel()
        return
    import ray

    if not ray.is_initialized():  # ray.cancel would start a Ray instance here
        return
    try:
        ray.cancel(gen)
    except Exception:  # already finished or its actor is dead
        pass
