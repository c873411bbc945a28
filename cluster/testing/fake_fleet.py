"""A FAKE fleet for fast control-plane tests: in-memory engine workers, no Ray
cluster, no vLLM.

It drives the real ``PlacementController``, ``Actuator`` and ``Router`` in
plain asyncio tests (``tests/test_control_fake.py``), beside the real-Ray
tests. What is real here: the worker's ``ModelRegistry`` and its state
machine, ``DeviceMemory`` accounting and the typed ``WorkerStats``. What is
fake: engines (a load takes ``load_s``), and tokens (a deterministic
function of model, prompt and position, so a resumed stream can be checked
for duplicated or missing tokens).

Hooks let a test hold a call (``gates``), see every call in order
(``journal``) and kill a worker (calls then raise Ray's ``RayActorError``,
as a dead actor's do). ``FakeFleet.autoscale`` is a FAKE autoscaler: it
does what Ray's would with the last standing request, when the test says.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.catalog import Catalog, ModelSpec
from cluster.engine.checkpoint import CheckpointInfo
from cluster.engine.contract import DeviceStats, ModelStatus, Unloaded, WorkerStats
from cluster.engine.device import DeviceMemory, DeviceSpec
from cluster.engine.registry import ACTIVE, LOADING, PARKED, UNLOADING, ModelRegistry
from cluster.errors import ModelNotActiveError

VOCAB = 1000


def fake_token(model: str, prompt: str, position: int) -> int:
    """The token a fake engine produces at ``position``: the same on every
    copy, so a stream resumed elsewhere continues exactly."""
    digest = hashlib.blake2b(f"{model}|{prompt}|{position}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % VOCAB


class FakeWorker:
    """The engine worker's control and request surface, in memory."""

    def __init__(self, device: DeviceSpec, journal: list, load_s: float = 0.0):
        self.device = device
        self.models = ModelRegistry(device.id)
        self.memory = DeviceMemory(device.memory_bytes)
        self.journal = journal  # (device, method, first argument) of every call
        self.load_s = load_s
        self.inflight: dict[str, str] = {}  # request id -> model
        self.moved: set[str] = set()  # request ids handed back by an evacuation
        # method -> an Event the call waits for before it acts (a test holds it).
        self.gates: dict[str, asyncio.Event] = {}
        self.stall_stats: asyncio.Event | None = None  # holds the next stats() reply
        self.hung = False  # no stats() reply ever comes

    async def _gate(self, method: str, arg: Any) -> None:
        self.journal.append((self.device.id, method, arg))
        gate = self.gates.get(method)
        if gate is not None:
            await gate.wait()

    # ---------------------------------------------------------------- control
    async def load(self, spec: dict | ModelSpec, park: bool = False) -> ModelStatus:
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
        await self._gate("load", spec.name)
        if spec.name in self.models:
            entry = self.models.get(spec.name)
            if not park and entry.state is PARKED:
                return await self.wake(spec.name)
            return self._status(spec.name)
        info = CheckpointInfo(spec.path, "FakeForCausalLM", spec.family, None)
        entry = self.models.add(spec, info, PARKED)
        if not park:
            await self._activate(entry)
        return self._status(spec.name)

    async def _activate(self, entry) -> None:
        self.memory.reserve(entry.name, entry.spec.weights_bytes + entry.spec.kv_cache_bytes,
                            f"loading {entry.name!r}")
        self.models.move(entry, LOADING)
        await asyncio.sleep(self.load_s)
        self.models.move(entry, ACTIVE)
        entry.draining = False

    async def wake(self, name: str) -> ModelStatus:
        await self._gate("wake", name)
        entry = self.models.get(name)
        if entry.state is PARKED:
            await self._activate(entry)
        return self._status(name)

    async def swap(self, name: str, replace: str | None = None) -> ModelStatus:
        await self._gate("swap", name)
        entry = self.models.get(name)
        if entry.state is not PARKED:
            return self._status(name)
        if replace is not None:  # the displaced model's memory passes to ``name``
            other = self.models.get(replace)
            self.models.move(other, PARKED)
            self.memory.release(replace)
        await self._activate(entry)
        return self._status(name)

    async def park(self, name: str) -> ModelStatus:
        await self._gate("park", name)
        entry = self.models.get(name)
        if entry.state is ACTIVE:
            self.models.move(entry, PARKED)
            self.memory.release(name)
        return self._status(name)

    async def unload(self, name: str) -> Unloaded:
        await self._gate("unload", name)
        entry = self.models.get(name)
        self.models.move(entry, UNLOADING)
        aborted = [r for r, m in self.inflight.items() if m == name and r not in self.moved]
        for r in aborted:
            self.inflight.pop(r)
        self.memory.release(name)
        self.models.remove(name)
        return Unloaded(name, len(aborted))

    async def evacuate(self, name: str) -> int:
        await self._gate("evacuate", name)
        self.models.get(name).draining = True
        moving = [r for r, m in self.inflight.items() if m == name]
        self.moved.update(moving)
        return len(moving)

    async def drop_vacant_shells(self) -> int:
        return 0

    async def shutdown(self) -> None:
        self.journal.append((self.device.id, "shutdown", None))

    def ping(self) -> str:
        return self.device.id

    async def stats(self) -> WorkerStats:
        """Taken when the call arrives, as a real reply is; a test may hold
        the reply back (``stall_stats``) so it arrives late and stale."""
        snapshot = self._snapshot()
        stall, self.stall_stats = self.stall_stats, None
        if self.hung:
            await asyncio.Event().wait()  # never answers
        if stall is not None:
            await stall.wait()
        return snapshot

    def _snapshot(self) -> WorkerStats:
        return WorkerStats(
            device=DeviceStats(self.device.id, self.device.kind, self.device.vendor,
                               self.device.accelerator_type, self.memory.used_bytes,
                               self.memory.budget_bytes, 0, False),
            shells={}, models={n: self._status(n) for n in self.models.names()},
            groups={}, tokens_per_s=0.0)

    def _status(self, name: str) -> ModelStatus:
        e = self.models.get(name)
        running = sum(1 for m in self.inflight.values() if m == name)
        return ModelStatus(
            name=name, family=e.spec.family, state=e.state, routable=e.routable,
            in_engine=e.in_engine, draining=e.draining, shell=None,
            architecture=e.info.architecture, weights_bytes=e.spec.weights_bytes,
            kv_cache_bytes=e.spec.kv_cache_bytes, running=running, waiting=0,
            tokens_per_s=0.0, last_swap_s=None)

    # --------------------------------------------------------------- requests
    async def generate(self, model: str, prompt: str | None = None,
                       prompt_token_ids: list[int] | None = None,
                       sampling: dict | None = None, request_id: str | None = None):
        desc = {"request_id": request_id, "model": model, "prompt": prompt or "",
                "prompt_token_ids": [], "sampling": dict(sampling or {})}
        async for chunk in self._stream(desc, 0):
            yield chunk

    async def resume(self, request: dict, generated_token_ids: list[int]):
        async for chunk in self._stream(request, len(generated_token_ids)):
            yield chunk

    async def _stream(self, desc: dict, start: int):
        model, rid = desc["model"], desc["request_id"]
        entry = self.models.get(model)
        if not entry.routable:
            raise ModelNotActiveError(f"model {model!r} is {entry.state} here")
        self.inflight[rid] = model
        self.moved.discard(rid)
        total = desc["sampling"].get("max_tokens", 16)
        try:
            for pos in range(start, total):
                await asyncio.sleep(0)  # one step: others run between tokens
                if rid in self.moved:
                    yield {"moved": True, "token_ids": [], "finished": False}
                    return
                if rid not in self.inflight:
                    raise ModelNotActiveError(f"model {model!r} was unloaded")
                done = pos == total - 1
                yield {"request": desc, "token_ids": [fake_token(model, desc["prompt"], pos)],
                       "text": "", "finished": done, "finish_reason": "length" if done else None}
        finally:
            self.inflight.pop(rid, None)


class LocalHandle:
    """Calls a plain object's methods the way Ray calls an actor's:
    ``handle.method.remote(*args)`` is awaitable, and with
    ``.options(num_returns="streaming")`` it is an async iterator of
    awaitables. A killed handle raises ``RayActorError`` like a dead actor."""

    def __init__(self, obj: Any):
        self._obj = obj
        self.dead = False

    def __getattr__(self, name: str) -> "_Method":
        return _Method(self, getattr(self._obj, name))


@dataclass
class _Method:
    handle: LocalHandle
    fn: Callable
    opts: dict = field(default_factory=dict)

    def options(self, **opts) -> "_Method":
        return _Method(self.handle, self.fn, opts)

    def remote(self, *args, **kwargs):
        if self.opts.get("num_returns") == "streaming":
            return _Stream(self.handle, self.fn(*args, **kwargs))
        return asyncio.ensure_future(self._call(*args, **kwargs))

    async def _call(self, *args, **kwargs):
        _check_alive(self.handle)
        out = self.fn(*args, **kwargs)
        if inspect.isawaitable(out):
            out = await out
        _check_alive(self.handle)
        return out


class _Stream:
    def __init__(self, handle: LocalHandle, agen):
        self.handle, self.agen = handle, agen

    def cancel(self) -> None:
        """What ``ray.cancel`` does to a real stream: the generator is closed."""
        asyncio.ensure_future(self.agen.aclose())

    def __aiter__(self):
        return self

    async def __anext__(self):
        _check_alive(self.handle)
        item = await self.agen.__anext__()  # StopAsyncIteration ends the stream
        _check_alive(self.handle)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(item)
        return fut


def _check_alive(handle: LocalHandle) -> None:
    if handle.dead:
        from ray.exceptions import RayActorError

        raise RayActorError()


class FakeFleet:
    """Devices declared up front; one fake worker per device, found again by
    a restarted controller (like Ray's named detached actors)."""

    def __init__(self, devices: list[DeviceSpec], load_s: float = 0.0):
        self.devices = {d.id: d for d in devices}
        self.journal: list[tuple[str, str, Any]] = []
        self.load_s = load_s
        self.handles: dict[str, LocalHandle] = {}
        # Every standing request sent, in order: (bundles, label selectors).
        self.requests: list[tuple[list[dict], list[dict]]] = []
        self.fail_requests = False  # request_capacity raises (Ray unreachable)

    def request_capacity(self, bundles: list[dict], label_selectors: list[dict]) -> None:
        if self.fail_requests:
            raise ConnectionError("FAKE: the GCS is unreachable")
        self.requests.append((bundles, label_selectors))

    def autoscale(self, new_device: Callable[[str, int], DeviceSpec],
                  node_types: tuple[str, ...] = ()) -> tuple[list, list]:
        """FAKE autoscaler: bring the devices of each requested accelerator
        type to the last request's count. It adds ``new_device(type, i)``
        where too few, and where too many removes devices nobody uses (no
        live worker), as Ray removes only idle nodes. It manages the
        accelerator types of ``node_types`` and any ever requested, and
        leaves other devices alone. Returns (added, removed)."""
        def kinds(bundles: list[dict]) -> Counter:
            return Counter(next(k.split(":", 1)[1] for k in b if k.startswith("accelerator_type:"))
                           for b in bundles)
        wanted = kinds(self.requests[-1][0] if self.requests else [])
        managed = set(node_types).union(*(kinds(b) for b, _ in self.requests))
        added, removed = [], []
        for kind in sorted(managed):
            have = sorted(d for d, spec in self.devices.items() if spec.accelerator_type == kind)
            for i in range(len(have), wanted[kind]):
                dev = new_device(kind, i)
                self.devices[dev.id] = dev
                added.append(dev.id)
            idle = [d for d in have if d not in self.handles or self.handles[d].dead]
            for d in idle[:max(0, len(have) - wanted[kind])]:
                del self.devices[d]
                removed.append(d)
        return added, removed

    def discover(self, catalog: Catalog) -> list[DeviceSpec]:
        return list(self.devices.values())

    def worker(self, device: DeviceSpec) -> LocalHandle:
        h = self.handles.get(device.id)
        if h is None or h.dead:
            h = self.handles[device.id] = LocalHandle(
                FakeWorker(device, self.journal, self.load_s))
        return h

    def fake(self, device_id: str) -> FakeWorker:
        return self.handles[device_id]._obj

    def kill(self, handle: LocalHandle) -> None:
        handle.dead = True
