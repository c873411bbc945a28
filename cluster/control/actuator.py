"""Carries out one policy action against the engine workers.

The order of steps is what keeps requests safe:

- anything that takes a copy out of service first takes it out of the route
  table, then *evacuates* it (in-flight streams end with a ``moved`` chunk and
  their routers resume them on another copy), then parks or unloads it;
- a migration is make-before-break: the target copy is active before the
  routes switch, and only then does the source drain and unload. If the
  target cannot be made, the source is untouched.

The elastic actions go to the controller's hooks (``ElasticHooks``):
``SetCapacity`` sends the standing request to Ray's autoscaler,
``ReleaseDevice`` stops an empty device's worker so its node can go, and
``ReclaimDevice`` starts one again on a released device still up.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Protocol

from cluster.engine.contract import ModelState
from policies.actions import (Action, Load, Migrate, Park, ReclaimDevice, ReleaseDevice, ScaleIn,
                              ScaleOut, SetCapacity, Swap, Unload, Wake)


class ElasticHooks(Protocol):
    def set_capacity(self, a: SetCapacity) -> dict: ...

    async def release_device(self, device: str) -> dict: ...

    async def reclaim_device(self, device: str) -> dict: ...


class Actuator:
    def __init__(self, worker: Callable[[str], object], spec: Callable[[str], dict],
                 unroute: Callable[[str, str], Awaitable[None]],
                 refresh: Callable[[], Awaitable[None]], elastic: ElasticHooks):
        self.worker = worker  # device id -> engine-worker actor handle
        self.spec = spec  # model name -> ModelSpec as a dict
        self.unroute = unroute  # take (model, device) out of the route table now
        self.refresh = refresh  # re-read worker stats and publish routes
        self.elastic = elastic  # the capacity side: the autoscaler and device release

    async def run(self, a: Action) -> object:
        """Execute ``a``; returns what the worker reported (for the action log)."""
        if isinstance(a, (Load, ScaleOut)):
            park = isinstance(a, Load) and a.park
            return await self.worker(a.device).load.remote(self.spec(a.model), park)
        if isinstance(a, Wake):
            return await self.worker(a.device).wake.remote(a.model)
        if isinstance(a, Swap):
            await self.unroute(a.replace, a.device)
            return await self.worker(a.device).swap.remote(a.model, a.replace)
        if isinstance(a, Park):
            await self._take_out(a.model, a.device)
            w = self.worker(a.device)
            out = await w.park.remote(a.model)
            await w.drop_vacant_shells.remote()  # the CPU shell's memory goes too
            return out
        if isinstance(a, (Unload, ScaleIn)):
            moved = await self._take_out(a.model, a.device)
            out = await self.worker(a.device).unload.remote(a.model)
            return {"name": out.name, "aborted_requests": out.aborted_requests,
                    "moved_requests": moved}
        if isinstance(a, Migrate):
            return await self.migrate(a.model, a.source, a.target)
        if isinstance(a, SetCapacity):
            return self.elastic.set_capacity(a)
        if isinstance(a, ReleaseDevice):
            return await self.elastic.release_device(a.device)
        if isinstance(a, ReclaimDevice):
            return await self.elastic.reclaim_device(a.device)
        # RequestCapacity never gets here: the elastic layer folds the wants
        # into the one standing request (SetCapacity).
        raise TypeError(f"unknown action {a!r}")

    async def migrate(self, model: str, source: str, target: str) -> dict:
        src, dst = self.worker(source), self.worker(target)
        there = (await dst.stats.remote()).models.get(model)
        if there is not None and there.state is ModelState.PARKED:
            made = await dst.wake.remote(model)
        else:
            made = await dst.load.remote(self.spec(model))
        await self.refresh()  # routes now include the target copy
        moved = await self._take_out(model, source)
        await src.unload.remote(model)
        return {"name": model, "source": source, "target": target,
                "target_state": str(made.state), "moved_requests": moved}

    async def _take_out(self, model: str, device: str) -> int:
        await self.unroute(model, device)
        return await self.worker(device).evacuate.remote(model)


def _devices_of(a) -> set[str]:
    return {getattr(a, f) for f in ("device", "source", "target") if hasattr(a, f)}


def chains(actions: list) -> list[list[int]]:
    """Group action indices so actions that share a device run one after
    another (in order) while independent devices proceed in parallel."""
    out: list[tuple[set[str], list[int]]] = []
    for i, a in enumerate(actions):
        devs = _devices_of(a)
        joined = [c for c in out if c[0] & devs]
        merged_devs, merged = set(devs), []
        for c in joined:
            out.remove(c)
            merged_devs |= c[0]
            merged += c[1]
        out.append((merged_devs, sorted(merged) + [i]))
    return [c[1] for c in out]
