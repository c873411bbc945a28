"""The engine worker: one Ray actor per device, serving several models on it.

A thin actor over parts with one job each:

- ``ModelRegistry`` (``registry.py``): the models here and their state
  machine (diagram in ``contract.py``);
- ``ShellPool`` (``shell_pool.py``): engine shells, the device memory they
  reserve, and the time-share group of each shared shell;
- ``HostWeightCache``: every model's checkpoint in host memory, so swaps and
  wakes never read the disk;
- ``RequestTracker`` (``request_stream.py``): requests in flight;
- a ``Serving`` per model (``serving.py``): its own shell, or its lane of a
  time-shared shell. Request entry points never ask which.

The placement controller tells it what to load, swap, park and unload; the
front door streams requests through ``generate``/``resume``/``openai``.
``stats()`` returns a typed ``WorkerStats``: the only thing the control
plane knows of the device.

Time-sharing (``device.timeshare`` set): the models of one family share one
shell and take turns on it (``timeshare.py``). Members are ``TIMESHARED``:
every one serves, and ``swap``/``park``/``wake`` leave it to its scheduler.

Fault-tolerance contract: every control method either completes or leaves
the registry and the memory accounting as they were before the call (a
failed engine start releases its reservation and forgets the model). Control
methods are serialized by one lock; generation is not, so models keep
streaming while another model loads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from cluster.catalog import SLO, ModelSpec, TimeshareConfig
from cluster.engine.checkpoint import read_checkpoint
from cluster.engine.contract import DeviceStats, ModelStatus, Unloaded, WorkerStats
from cluster.engine.device import DeviceSpec
from cluster.engine.registry import ACTIVE, PARKED, TIMESHARED, UNLOADING, ModelEntry, ModelRegistry
from cluster.engine.request_stream import InflightRequest, RequestTracker, run_stream
from cluster.engine.residency import Residency
from cluster.engine.serving import DedicatedServing, Serving
from cluster.engine.shell import engine_died
from cluster.engine.shell_pool import ShellPool
from cluster.engine.weight_cache import HostWeightCache
from cluster.errors import BadRequestError, ModelNotActiveError

log = logging.getLogger(__name__)


class EngineWorker:
    """Plain class; ``start_engine_worker`` wraps it as a Ray actor."""

    def __init__(self, device: DeviceSpec):
        self.device = device
        self.models = ModelRegistry(device.id)
        self.pool = ShellPool(device.memory_bytes, device.kind, eager=device.kind == "cpu")
        self.cache = HostWeightCache(owner=device.id.replace("/", "_"))
        self.requests = RequestTracker()
        self.residency = Residency(device.id, self.models, self.pool, self.cache,
                                   self.requests, lambda: self.device.timeshare)
        self._control = asyncio.Lock()

    # ------------------------------------------------------------------ control
    async def load(self, spec: dict | ModelSpec, park: bool = False) -> ModelStatus:
        """Load a model onto the device in an engine of its own: a vacant
        same-family shell if one is left over, else a new engine. On a
        time-sharing device a model whose family has a shared engine joins it.

        With ``park=True`` the model is only cached in host memory (state
        parked), ready for a fast ``swap``/``wake`` into a same-family shell.
        Idempotent: loading a registered model returns its status (a parked
        one is activated when ``park`` is false).
        """
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
        async with self._control:
            if spec.name in self.models:
                entry = self.models.get(spec.name)
                if not park and entry.state is PARKED:
                    await self.residency.wake(entry)
                return self._status(entry)
            info = read_checkpoint(spec.path)
            spec = spec.resolved()
            group = self.pool.group(info.swap_signature)
            state = TIMESHARED if group is not None else PARKED
            self.cache.put(spec.name, spec.path)
            entry = self.models.add(spec, info, state)
            try:
                if group is not None:
                    await group.prepare(spec.name)  # prefetch while the device idles
                elif not park:
                    await self.residency.activate(entry)
            except BaseException:
                self.models.remove(spec.name)
                self.cache.drop(spec.name)
                raise
            return self._status(entry)

    async def swap(self, name: str, replace: str | None = None) -> ModelStatus:
        """Make parked model ``name`` active by swapping it into a shell in place.

        The shell is the one holding ``replace`` if given, else a vacant
        same-family shell, else an idle active same-family model's shell. The
        displaced model becomes parked (its weights stay in the host cache).
        """
        async with self._control:
            entry = self.models.get(name)
            if entry.state in (ACTIVE, TIMESHARED):
                return self._status(entry)  # a member's turns are its scheduler's
            if entry.state is not PARKED:
                raise ModelNotActiveError(f"model {name!r} is {entry.state}, cannot swap in")
            await self.residency.swap_into(self.residency.shell_for(entry, replace), entry)
            return self._status(entry)

    async def park(self, name: str) -> ModelStatus:
        """Take an idle model out of its engine, keeping its weights in host RAM.

        GPU: vLLM sleep mode offloads the weights and frees device memory; the
        shell stays for a fast ``wake``. CPU (no sleep mode): the weights are
        already in the host cache, so the shell is simply left vacant for the
        next same-family model to be swapped into; ``unload`` of the last model
        or ``drop_vacant_shells`` shuts it down and frees its memory.
        """
        async with self._control:
            entry = self.models.get(name)
            if entry.state is not ACTIVE:
                return self._status(entry)  # parked already, or a time-share member
            await self.residency.park(entry)
            return self._status(entry)

    async def wake(self, name: str) -> ModelStatus:
        """Parked -> active in an engine of its own: ``wake_up`` of its
        sleeping engine on GPU, else a vacant shell or a new engine. It never
        takes over another model's engine (that is ``swap``)."""
        async with self._control:
            entry = self.models.get(name)
            if entry.state is PARKED:
                await self.residency.wake(entry)
            return self._status(entry)

    async def unload(self, name: str) -> Unloaded:
        """Remove a model: abort its requests, free its shell, drop its cache."""
        async with self._control:
            entry = self.models.get(name)
            member = entry.state is TIMESHARED
            self.models.move(entry, UNLOADING)
            aborted = await self.requests.abort_model(
                name, self._abort_in_engine, reason=f"model {name!r} was unloaded")
            await self.residency.remove(entry, member)
            return Unloaded(name, aborted)

    async def evacuate(self, name: str) -> int:
        """Hand ``name``'s in-flight requests back to their callers to resume
        elsewhere (migration, scale-in, consolidation): each stream ends
        with a ``moved`` chunk, at once. Every request can move (OpenAI ones
        too: their state lives at the front door), so nothing is drained.
        The model takes no new requests afterwards; unload or park it next."""
        async with self._control:
            entry = self.models.get(name)
            entry.draining = True
            return await self.requests.move_model(name, self._abort_in_engine)

    def set_timeshare(self, config: dict) -> dict:
        """Retune time-sharing live (discipline, quotas) on this device's
        shared engines; it must already be on. Returns the config in force."""
        if self.device.timeshare is None:
            raise BadRequestError(f"device {self.device.id!r} does not time-share "
                                  f"(set timeshare in its catalog entry)")
        cfg = TimeshareConfig.model_validate({**self.device.timeshare.model_dump(), **config})
        self.device = dataclasses.replace(self.device, timeshare=cfg)
        self.pool.retune(cfg)
        return cfg.model_dump()

    def set_slo(self, name: str, slo: dict) -> dict:
        """A model's SLO changed in the catalog: time-sharing quotas follow it."""
        entry = self.models.get(name)
        entry.spec = entry.spec.model_copy(update={"slo": SLO.model_validate(slo)})
        return entry.spec.slo.model_dump()

    async def drop_vacant_shells(self) -> int:
        """Shut down dedicated shells that hold no model, freeing their memory."""
        async with self._control:
            vacant = [s for s in self.pool if s.resident is None and not s.sleeping
                      and s.id not in self.pool.groups]
            for s in vacant:
                self.pool.close(s)
            return len(vacant)

    async def shutdown(self) -> None:
        for entry in self.models:
            await self.requests.abort_model(entry.name, lambda rid: None,
                                            reason="engine worker shut down")
        self.pool.close_all()
        for entry in self.models:
            self.models.remove(entry.name)
        self.cache.close()

    # --------------------------------------------------------------- requests
    async def generate(self, model: str, prompt: str | None = None,
                       prompt_token_ids: list[int] | None = None,
                       sampling: dict | None = None,
                       request_id: str | None = None) -> AsyncIterator[dict]:
        """Stream one request's output as dict chunks (a Ray streaming generator).

        The first chunk carries ``prompt_token_ids`` so the caller can later
        ``resume`` the request elsewhere. If the consumer goes away (Ray task
        cancelled), the request is aborted inside vLLM.
        """
        entry, serving = self._serving(model)
        ids = list(prompt_token_ids) if prompt_token_ids is not None \
            else serving.tokenize(prompt or "")
        req = InflightRequest(request_id or uuid.uuid4().hex, model, ids, _sampling(sampling))
        async for chunk in _or_die(run_stream(self.requests, serving, entry.spec.max_model_len,
                                              req, [], device=self.device.id), self.device.id):
            yield chunk

    async def resume(self, request: dict, generated_token_ids: list[int]) -> AsyncIterator[dict]:
        """Continue a request from a token prefix by re-prefilling it.

        ``request`` is the first chunk's request description (``model``,
        ``prompt_token_ids``, ``sampling``, ``request_id``). Prompt plus
        generated tokens are prefilled as one prompt and generation continues
        for the remaining budget; with greedy sampling the concatenation
        equals an uninterrupted run. Seeded random sampling restarts its RNG
        stream, so it continues validly but not identically.
        """
        entry, serving = self._serving(request["model"])
        req = InflightRequest(request.get("request_id") or uuid.uuid4().hex, request["model"],
                              list(request["prompt_token_ids"]), _sampling(request.get("sampling")))
        async for chunk in _or_die(run_stream(self.requests, serving, entry.spec.max_model_len,
                                              req, list(generated_token_ids),
                                              device=self.device.id), self.device.id):
            yield chunk

    async def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        await self._abort_in_engine(request_id)
        return True

    # ------------------------------------------------------------------ status
    def stats(self) -> WorkerStats:
        return WorkerStats(
            device=DeviceStats(
                id=self.device.id, kind=self.device.kind, vendor=self.device.vendor,
                accelerator_type=self.device.accelerator_type,
                memory_used_bytes=self.pool.memory.used_bytes,
                memory_budget_bytes=self.pool.memory.budget_bytes,
                host_cache_bytes=self.cache.total_bytes, sleep_mode=self.pool.sleep_mode,
                platform=self.pool.platform.package if self.pool.platform else None),
            shells=self.pool.shell_stats(),
            models={e.name: self._status(e) for e in self.models},
            groups=self.pool.group_stats(),
            tokens_per_s=self.requests.tokens_per_s(None))

    def ping(self) -> str:
        return self.device.id

    # --------------------------------------------------------------- internals
    def _serving(self, name: str) -> tuple[ModelEntry, Serving]:
        """The model's entry and what runs its requests."""
        entry = self.models.get(name)
        if not entry.routable:
            state = "draining" if entry.draining else str(entry.state)
            raise ModelNotActiveError(f"model {name!r} is {state} on device "
                                      f"{self.device.id!r}; wake or swap it in first")
        if entry.state is TIMESHARED:
            return entry, self.pool.group(entry.info.swap_signature).lane(name, entry.spec.path)
        return entry, DedicatedServing(self.pool.get(entry.shell_id), name, entry.spec.path)

    async def _abort_in_engine(self, request_id: str) -> None:
        # Whatever the model's state now (an unloading one is no member any
        # more), a request still held by a time-sharing scheduler ends there.
        if any(group.abort(request_id) for group in self.pool.groups.values()):
            return
        req = self.requests.get(request_id)
        entry = self.models.find(req.model if req is not None else None)
        shell = self.pool.get(entry.shell_id) if entry is not None else None
        if shell is not None:
            await shell.abort(request_id)

    def _status(self, e: ModelEntry) -> ModelStatus:
        counts = self.requests.counts(e.name)
        latency = self.requests.latency.get(e.name, {})
        group = self.pool.group(e.info.swap_signature) if e.state is TIMESHARED else None
        return ModelStatus(
            name=e.name, family=e.spec.family, state=e.state, routable=e.routable,
            in_engine=e.in_engine, draining=e.draining, shell=e.shell_id,
            architecture=e.info.architecture, weights_bytes=e.spec.weights_bytes,
            kv_cache_bytes=e.spec.kv_cache_bytes, running=counts["running"],
            waiting=counts["waiting"], tokens_per_s=self.requests.tokens_per_s(e.name),
            last_swap_s=e.last_swap_s, ttft_s=latency.get("ttft_s"),
            tpot_s=latency.get("tpot_s"),
            turns=group.model_stats(e.name) if group is not None else None)


def _sampling(sampling: Any) -> Any:
    """A sampling dict (copied), or a vLLM SamplingParams as it is."""
    return dict(sampling or {}) if sampling is None or isinstance(sampling, dict) else sampling


def start_engine_worker(device: DeviceSpec, name: str | None = None, **actor_options):
    """Create the worker as a Ray actor (async, so requests stream concurrently)."""
    import ray

    opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1000}
    if name:
        opts["name"] = name
    opts.update(actor_options)
    return ray.remote(EngineWorker).options(**opts).remote(device)


async def _or_die(chunks: AsyncIterator[dict], device: str) -> AsyncIterator[dict]:
    """Relay a request's chunks; if its vLLM engine has died (engine-core
    process killed or crashed: ``shell.engine_died``), end this worker's
    process. Why the whole worker: a dead engine never serves again, yet
    its copies would still look routable, and every request sent there
    would fail with an error instead of moving. A dead worker is the case
    the rest of Shoal already handles: the router resumes each request in
    flight on another copy from the tokens it has (identical greedy
    output), the controller replaces the worker and places the models
    again, and the raylet (``REAP_ENV``) reaps the other engine cores."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:
        if engine_died(e):
            log.error("a vLLM engine on %s died (%r): ending the worker so its requests "
                      "resume elsewhere", device, e)
            for h in logging.getLogger().handlers:
                h.flush()
            os._exit(1)
        raise
