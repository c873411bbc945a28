"""The engine worker: one Ray actor per device, serving several models on it.

It owns the device's engine shells (vLLM engines), a registry of the models
resident on the device, the device memory accounting and a host-memory
weight cache. The placement controller tells it what to load, swap, park and
unload; the front door streams requests through ``generate``.

Model states::

    loading --> active <--> parked
       |          |           |
       +------> unloading <---+   (then gone)

- active: the model's weights are in a shell and it serves requests.
- parked: the weights are only in the host cache (CPU), or the shell sleeps
  (GPU sleep mode). Waking is a swap or ``wake_up``, never a disk read.

Time-sharing (``device.timeshare`` set): the models of one family share one
shell and take turns on it at token granularity (``cluster/timeshare.py``).
Every such model, active (its weights in the shell now) or parked, serves
requests; its scheduler does the swaps, so ``swap`` and ``park`` leave a
member as it is, and a same-family ``load`` joins the group instead of
starting an engine.

Fault-tolerance contract: every control method either completes or leaves
the registry and the memory accounting as they were before the call (a
failed engine start releases its reservation and forgets the model). Control
methods are serialized by one lock; generation is not, so models keep
streaming while another model loads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cluster.catalog import SLO, ModelSpec, TimeshareConfig
from cluster.checkpoint import CheckpointInfo, read_checkpoint
from cluster.device import DeviceMemory, DeviceSpec, sleep_mode_supported
from cluster.engine_shell import EngineShell
from cluster.errors import (BadRequestError, IncompatibleModelError, ModelBusyError,
                            ModelNotActiveError, UnknownModelError)
from cluster.request_stream import InflightRequest, RequestTracker, run_stream
from cluster.timeshare import Lane, TimeShareScheduler
from cluster.weight_cache import HostWeightCache

log = logging.getLogger(__name__)

LOADING, ACTIVE, PARKED, UNLOADING = "loading", "active", "parked", "unloading"
DRAIN_S = 60.0  # how long an evacuation waits for requests that cannot move


@dataclass
class ModelEntry:
    spec: ModelSpec
    info: CheckpointInfo
    state: str
    shell_id: str | None = None  # shell holding (or sleeping with) the weights
    last_swap_s: float | None = None
    draining: bool = False  # evacuated: takes no new requests (stale routes)
    loaded_at: float = field(default_factory=time.time)


class EngineWorker:
    """Plain class; ``start_engine_worker`` wraps it as a Ray actor."""

    def __init__(self, device: DeviceSpec):
        self.device = device
        self.memory = DeviceMemory(device.memory_bytes)
        self.cache = HostWeightCache(owner=device.id.replace("/", "_"))
        self.sleep_mode = sleep_mode_supported(device.kind)
        self.models: dict[str, ModelEntry] = {}
        self.shells: dict[str, EngineShell] = {}
        self.requests = RequestTracker()
        self._control = asyncio.Lock()
        self._shell_ids = itertools.count()
        self.timeshare: dict[str, TimeShareScheduler] = {}  # shell id -> its scheduler

    # ------------------------------------------------------------------ control
    async def load(self, spec: dict | ModelSpec, park: bool = False) -> dict:
        """Load a model onto the device in an engine of its own: a vacant
        same-family shell if one is left over, else a new engine.

        With ``park=True`` the model is only cached in host memory (state
        parked), ready for a fast ``swap``/``wake`` into a same-family shell.
        Idempotent: loading a registered model returns its status (a parked
        one is activated when ``park`` is false).
        """
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
        async with self._control:
            if spec.name in self.models:
                entry = self.models[spec.name]
                if not park and entry.state == PARKED and self._scheduler(entry) is None:
                    return await self._wake(entry)
                return self._model_status(spec.name)
            info = read_checkpoint(spec.path)
            spec = spec.resolved()
            group = self._group(info.swap_signature)
            if group is not None:  # joins the family's time-shared engine
                self.cache.put(spec.name, spec.path)
                self.models[spec.name] = ModelEntry(spec, info, PARKED)
                await group.prepare(spec.name)
                return self._model_status(spec.name)
            if park:
                self.cache.put(spec.name, spec.path)
                self.models[spec.name] = ModelEntry(spec, info, PARKED)
                return self._model_status(spec.name)
            entry = self.models[spec.name] = ModelEntry(spec, info, PARKED)
            try:
                self.cache.put(spec.name, spec.path)
                return await self._activate(entry)
            except BaseException:
                self.models.pop(spec.name, None)
                self.cache.drop(spec.name)
                raise

    async def swap(self, name: str, replace: str | None = None) -> dict:
        """Make parked model ``name`` active by swapping it into a shell in place.

        The shell is the one holding ``replace`` if given, else a vacant
        same-family shell, else an idle active same-family model's shell. The
        displaced model becomes parked (its weights stay in the host cache).
        """
        async with self._control:
            entry = self._entry(name)
            if entry.state == ACTIVE or self._scheduler(entry) is not None:
                return self._model_status(name)  # a member's turns are its scheduler's
            if entry.state != PARKED:
                raise ModelNotActiveError(f"model {name!r} is {entry.state}, cannot swap in")
            shell = self._shell_for(entry, replace)
            return await self._swap_into(shell, entry)

    async def park(self, name: str) -> dict:
        """Take an idle model out of its engine, keeping its weights in host RAM.

        GPU: vLLM sleep mode offloads the weights and frees device memory; the
        shell stays for a fast ``wake``. CPU (no sleep mode): the weights are
        already in the host cache, so the shell is simply left vacant for the
        next same-family model to be swapped into; ``unload`` of the last model
        or ``drop_vacant_shells`` shuts it down and frees its memory.
        """
        async with self._control:
            entry = self._entry(name)
            if entry.state == PARKED or self._scheduler(entry) is not None:
                return self._model_status(name)
            self._require_idle(entry, "park")
            shell = self.shells[entry.shell_id]
            if self.sleep_mode:
                await shell.sleep()
                self.memory.release(shell.id)
            else:
                shell.resident = None
                entry.shell_id = None
            entry.state = PARKED
            return self._model_status(name)

    async def wake(self, name: str) -> dict:
        """Parked -> active in an engine of its own: ``wake_up`` of its
        sleeping engine on GPU, else a vacant shell or a new engine. It never
        takes over another model's engine (that is ``swap``)."""
        async with self._control:
            entry = self._entry(name)
            if entry.state == ACTIVE or self._scheduler(entry) is not None:
                return self._model_status(name)  # a time-sharing member serves as it is
            return await self._wake(entry)

    async def unload(self, name: str) -> dict:
        """Remove a model: abort its requests, free its shell, drop its cache."""
        async with self._control:
            entry = self._entry(name)
            sched = self._scheduler(entry)
            entry.state = UNLOADING
            aborted = await self.requests.abort_model(
                name, lambda rid: self._abort_in_engine(entry, rid),
                reason=f"model {name!r} was unloaded")
            if sched is not None:
                await sched.leave(name)  # its turn ends; its weights are never reused
                if not self._members(sched):  # it was the last: the engine goes
                    self._close_shell(sched.shell)
            else:
                shell = self.shells.get(entry.shell_id or "")
                if shell is not None and shell.resident in (name, None):
                    self._close_shell(shell)
            for s in self.shells.values():  # its prepared copies (CPU fast swap)
                await s.forget(name)
            self.cache.drop(name)
            del self.models[name]
            return {"name": name, "state": "unloaded", "aborted_requests": aborted}

    async def evacuate(self, name: str, drain_s: float = DRAIN_S) -> int:
        """Hand ``name``'s in-flight requests back to their callers to resume
        elsewhere (migration): each stream ends with a ``moved`` chunk. The
        model takes no new requests afterwards; unload or park it next.

        OpenAI-layer requests cannot move (vLLM's serving state is here):
        they get up to ``drain_s`` to finish; unload then ends the rest with
        a clear error."""
        async with self._control:
            entry = self._entry(name)
            entry.draining = True
            moved = await self.requests.move_model(
                name, lambda rid: self._abort_in_engine(entry, rid))
            deadline = time.monotonic() + drain_s
            while self.requests.count(name) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return moved

    def set_timeshare(self, config: dict) -> dict:
        """Retune time-sharing live (discipline, quotas) on this device's
        shared engines; it must already be on. Returns the config in force."""
        if self.device.timeshare is None:
            raise BadRequestError(f"device {self.device.id!r} does not time-share "
                                  f"(set timeshare in its catalog entry)")
        cfg = TimeshareConfig.model_validate({**self.device.timeshare.model_dump(), **config})
        self.device = dataclasses.replace(self.device, timeshare=cfg)
        for sched in self.timeshare.values():
            sched.cfg = cfg
        return cfg.model_dump()

    def set_slo(self, name: str, slo: dict) -> dict:
        """A model's SLO changed in the catalog: time-sharing quotas follow it."""
        entry = self._entry(name)
        entry.spec = entry.spec.model_copy(update={"slo": SLO.model_validate(slo)})
        return entry.spec.slo.model_dump()

    async def drop_vacant_shells(self) -> int:
        """Shut down shells that hold no model, freeing their memory."""
        async with self._control:
            vacant = [s for s in self.shells.values() if s.resident is None and not s.sleeping
                      and not (s.id in self.timeshare and self._members(self.timeshare[s.id]))]
            for s in vacant:
                self._close_shell(s)
            return len(vacant)

    async def shutdown(self) -> None:
        for entry in list(self.models.values()):
            await self.requests.abort_model(entry.spec.name, lambda rid: None,
                                            reason="engine worker shut down")
        for s in list(self.shells.values()):
            self._close_shell(s)
        self.models.clear()
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
        entry, shell = self._serving(model)
        ids = list(prompt_token_ids) if prompt_token_ids is not None else shell.tokenize(prompt or "")
        req = InflightRequest(request_id or uuid.uuid4().hex, model, ids, dict(sampling or {}))
        async for chunk in run_stream(self.requests, shell, entry.spec.max_model_len, req, []):
            yield chunk

    async def openai(self, kind: str, body: dict) -> AsyncIterator[dict | str]:
        """One OpenAI request (``kind``: "chat" or "completions") through
        vLLM's own serving layer next to the model's engine; see
        ``cluster/openai_serving.py`` for what is yielded."""
        entry, shell = self._serving(str(body.get("model")))
        if isinstance(shell, Lane):
            # vLLM's serving layer keeps its request state in the engine, so
            # it cannot be preempted: it holds the model's turn until done.
            sched = shell.scheduler
            async with sched.exclusive(entry.spec.name):
                serving = await sched.shell.openai(entry.spec.name, entry.spec.path)
                async for item in serving.handle(self.requests, entry.spec.name, kind, body):
                    yield item
            return
        serving = await shell.openai(entry.spec.name, entry.spec.path)
        if self._serving(entry.spec.name)[1] is not shell:  # swapped out meanwhile
            raise ModelNotActiveError(f"model {entry.spec.name!r} left its engine; retry")
        # No await from here until ``handle`` has registered the request, so
        # a swap (which needs the model idle) cannot slip in between.
        async for item in serving.handle(self.requests, entry.spec.name, kind, body):
            yield item

    async def openai_once(self, kind: str, body: dict) -> dict:
        """A non-streaming OpenAI request as one plain actor call: cheaper
        than a streaming generator for a single item. The body comes back
        as JSON text (``body_json``), so it is serialized once, here."""
        items = self.openai(kind, body)
        try:
            item = await items.__anext__()
        finally:
            await items.aclose()
        return {"status": item["status"], "body_json": json.dumps(item["body"])} \
            if "body" in item else item

    async def resume(self, request: dict, generated_token_ids: list[int]) -> AsyncIterator[dict]:
        """Continue a request from a token prefix by re-prefilling it.

        ``request`` is the first chunk's request description (``model``,
        ``prompt_token_ids``, ``sampling``, ``request_id``). Prompt plus
        generated tokens are prefilled as one prompt and generation continues
        for the remaining budget; with greedy sampling the concatenation
        equals an uninterrupted run. Seeded random sampling restarts its RNG
        stream, so it continues validly but not identically.
        """
        entry, shell = self._serving(request["model"])
        req = InflightRequest(request.get("request_id") or uuid.uuid4().hex, request["model"],
                              list(request["prompt_token_ids"]), dict(request.get("sampling") or {}))
        async for chunk in run_stream(self.requests, shell, entry.spec.max_model_len, req,
                                      list(generated_token_ids)):
            yield chunk

    async def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        entry = self.models.get(req.model)
        if entry is not None:
            await self._abort_in_engine(entry, request_id)
        return True

    # ------------------------------------------------------------------ status
    def stats(self) -> dict:
        return {
            "device": {"id": self.device.id, "kind": self.device.kind,
                       "vendor": self.device.vendor,
                       "accelerator_type": self.device.accelerator_type,
                       "memory_used_bytes": self.memory.used_bytes,
                       "memory_budget_bytes": self.memory.budget_bytes,
                       "host_cache_bytes": self.cache.total_bytes,
                       "sleep_mode": self.sleep_mode},
            "shells": {s.id: {"resident": s.resident, "sleeping": s.sleeping,
                              "last_swap_path": s.last_swap_path,
                              "prepared_bytes": s.prepared_bytes(),
                              # vLLM's own count: proves aborted requests are gone
                              "engine_unfinished": s.engine.get_num_unfinished_requests()}
                       for s in self.shells.values()},
            "models": {n: self._model_status(n) for n in self.models},
            "timeshare": {sid: s.stats() for sid, s in self.timeshare.items()},
            "tokens_per_s": self.requests.tokens_per_s(None),
        }

    def ping(self) -> str:
        return self.device.id

    # --------------------------------------------------------------- internals
    def _entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise UnknownModelError(f"model {name!r} is not loaded on device {self.device.id!r}; "
                                    f"loaded: {sorted(self.models)}")
        return entry

    def _serving(self, name: str):
        """The model's entry and what runs its requests: its shell, or its
        lane of a time-shared shell (same generate/abort/tokenize)."""
        entry = self._entry(name)
        sched = self._scheduler(entry)
        if sched is not None and not entry.draining:
            return entry, sched.lane(name)
        if entry.state != ACTIVE or entry.draining:
            state = "draining" if entry.draining else entry.state
            raise ModelNotActiveError(f"model {name!r} is {state} on device "
                                      f"{self.device.id!r}; wake or swap it in first")
        return entry, self.shells[entry.shell_id]

    def _require_idle(self, entry: ModelEntry, action: str) -> None:
        n = self.requests.count(entry.spec.name)
        if n:
            raise ModelBusyError(f"cannot {action} model {entry.spec.name!r}: "
                                 f"{n} request(s) in flight")

    def _shell_for(self, entry: ModelEntry, replace: str | None) -> EngineShell:
        sig = entry.info.swap_signature
        if replace is not None:
            other = self._entry(replace)
            if other.state != ACTIVE:
                raise ModelNotActiveError(f"model {replace!r} is {other.state}, not in a shell")
            shell = self.shells[other.shell_id]
            if shell.swap_signature != sig:
                raise IncompatibleModelError(
                    f"cannot swap {entry.spec.name!r} ({entry.info.architecture}) into the engine "
                    f"of {replace!r} ({other.info.architecture}): tensor shapes or tokenizer differ")
            self._require_idle(other, "swap out")
            return shell
        vacant = self._vacant_shell(sig)
        if vacant is not None:
            return vacant
        same = [s for s in self.shells.values() if s.swap_signature == sig and not s.sleeping]
        for s in same:
            if not self.requests.count(s.resident):
                return s
        if same:
            raise ModelBusyError(f"every engine that {entry.spec.name!r} can swap into is "
                                 f"serving requests: {[s.resident for s in same]}")
        raise IncompatibleModelError(
            f"no engine on device {self.device.id!r} shares the shapes and tokenizer of "
            f"{entry.spec.name!r} ({entry.info.architecture}); load it into a new engine instead")

    async def _wake(self, entry: ModelEntry) -> dict:
        shell = self.shells.get(entry.shell_id or "")
        if shell is not None and shell.sleeping:
            self.memory.reserve(shell.id, _footprint(entry.spec), f"waking {entry.spec.name!r}")
            await shell.wake()
            entry.state, entry.draining = ACTIVE, False
            return self._model_status(entry.spec.name)
        return await self._activate(entry)

    async def _activate(self, entry: ModelEntry) -> dict:
        """Parked -> active: into a vacant same-family shell if there is one
        (component reuse: milliseconds), else a new engine (tens of seconds).
        On failure the model is parked again and its reservation released."""
        vacant = self._vacant_shell(entry.info.swap_signature)
        if vacant is not None:
            return await self._swap_into(vacant, entry)
        shell_id = f"shell{next(self._shell_ids)}"
        self.memory.reserve(shell_id, _footprint(entry.spec), f"loading {entry.spec.name!r}")
        entry.state, entry.shell_id = LOADING, shell_id
        try:
            shell = await EngineShell.start(shell_id, entry.spec, entry.info, self.sleep_mode,
                                            eager=self.device.kind == "cpu")
        except BaseException:
            self.memory.release(shell_id)
            entry.state, entry.shell_id = PARKED, None
            raise
        self.shells[shell_id] = shell
        if self.device.timeshare is not None:
            self.timeshare[shell_id] = TimeShareScheduler(
                shell, lambda name: self._timeshare_switch(shell, name),
                self._slo_of,
                self.device.timeshare)
        entry.state, entry.draining = ACTIVE, False
        return self._model_status(entry.spec.name)

    # ------------------------------------------------------------ time-sharing
    def _group(self, signature: str) -> TimeShareScheduler | None:
        """The scheduler of this family's time-shared shell here, if any."""
        return next((s for s in self.timeshare.values()
                     if s.shell.swap_signature == signature), None)

    def _scheduler(self, entry: ModelEntry) -> TimeShareScheduler | None:
        """The scheduler ``entry`` takes turns under, if it is a member
        (loading = being switched in by it)."""
        if entry.state not in (ACTIVE, PARKED, LOADING):
            return None
        return self._group(entry.info.swap_signature)

    def _members(self, sched: TimeShareScheduler) -> list[str]:
        """The models that take turns under ``sched``."""
        return [n for n, e in self.models.items() if self._scheduler(e) is sched]

    def _slo_of(self, name: str) -> tuple[float, float]:
        slo = self.models[name].spec.slo if name in self.models else SLO()
        return slo.ttft_s, slo.tpot_s

    async def _timeshare_switch(self, shell: EngineShell, name: str) -> float:
        """The scheduler's switch: ``name``'s weights into the shared shell."""
        entry = self.models.get(name)
        if entry is None or entry.state not in (ACTIVE, PARKED):
            raise ModelNotActiveError(f"model {name!r} is no longer on device {self.device.id!r}")
        await self._swap_into(shell, entry)
        return entry.last_swap_s or 0.0

    def _vacant_shell(self, signature: str) -> EngineShell | None:
        for s in self.shells.values():
            if s.swap_signature == signature and s.resident is None and not s.sleeping:
                return s
        return None

    async def _swap_into(self, shell: EngineShell, entry: ModelEntry) -> dict:
        displaced = self.models.get(shell.resident or "")
        cached = self.cache.get(entry.spec.name) or self.cache.put(entry.spec.name, entry.spec.path)
        entry.state = LOADING
        if displaced is not None:
            displaced.state, displaced.shell_id = PARKED, None
        try:
            entry.last_swap_s = await shell.swap_in(entry.spec.name, str(cached.dir))
        except BaseException:
            entry.state = PARKED  # the shell is left vacant; its old model stays parked
            raise
        entry.state, entry.shell_id, entry.draining = ACTIVE, shell.id, False
        return self._model_status(entry.spec.name)

    async def _abort_in_engine(self, entry: ModelEntry, request_id: str) -> None:
        # Whatever the model's state now (an unloading one is no member any
        # more), a request still held by a time-sharing scheduler ends there.
        if any(sched.abort(request_id) for sched in self.timeshare.values()):
            return
        shell = self.shells.get(entry.shell_id or "")
        if shell is not None:
            await shell.abort(request_id)

    def _close_shell(self, shell: EngineShell) -> None:
        sched = self.timeshare.pop(shell.id, None)
        if sched is not None:
            sched.close()
        shell.shutdown()
        self.shells.pop(shell.id, None)
        self.memory.release(shell.id)

    def _model_status(self, name: str) -> dict:
        e = self.models[name]
        counts = self.requests.counts(name)
        sched = self._scheduler(e)
        latency = self.requests.latency.get(name, {})
        return {"name": name, "state": e.state, "family": e.spec.family,
                # Takes requests here now: active, or a time-sharing member.
                "servable": not e.draining and (e.state == ACTIVE or sched is not None),
                "timeshared": sched is not None,
                "ttft_s": latency.get("ttft_s"), "tpot_s": latency.get("tpot_s"),
                "turns": sched.model_stats(name) if sched is not None else None,
                "architecture": e.info.architecture, "shell": e.shell_id,
                "weights_bytes": e.spec.weights_bytes, "kv_cache_bytes": e.spec.kv_cache_bytes,
                "running": counts["running"], "waiting": counts["waiting"], "draining": e.draining,
                "tokens_per_s": self.requests.tokens_per_s(name),
                "last_swap_s": e.last_swap_s}


def _footprint(spec: ModelSpec) -> int:
    """Device bytes one shell of this model reserves: weights plus KV cache."""
    return spec.weights_bytes + spec.kv_cache_bytes


def start_engine_worker(device: DeviceSpec, name: str | None = None, **actor_options):
    """Create the worker as a Ray actor (async, so requests stream concurrently)."""
    import ray

    opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1000}
    if name:
        opts["name"] = name
    opts.update(actor_options)
    return ray.remote(EngineWorker).options(**opts).remote(device)
