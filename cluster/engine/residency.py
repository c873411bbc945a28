"""Where a model's weights live on one device: moving them into and out of
engines.

A model becomes active in a vacant same-family shell (a swap: milliseconds,
Aegaeon's component reuse), a sleeping engine of its own (GPU wake), or a
new engine (tens of seconds); it is displaced by a swap or parked. On a
time-sharing device the first model's engine founds its family's group and
the group's scheduler swaps members in for their turns through
``swap_into``. Every move goes through the registry's state machine, and a
failed move leaves the model parked and its memory released.
"""

from __future__ import annotations

from collections.abc import Callable

from cluster.catalog import SLO, TimeshareConfig
from cluster.engine.registry import (ACTIVE, LOADING, PARKED, TIMESHARED, ModelEntry,
                                     ModelRegistry)
from cluster.engine.request_stream import RequestTracker
from cluster.engine.shell import EngineShell
from cluster.engine.shell_pool import ShellPool
from cluster.engine.weight_cache import HostWeightCache
from cluster.errors import IncompatibleModelError, ModelBusyError, ModelNotActiveError


class Residency:
    def __init__(self, device_id: str, models: ModelRegistry, pool: ShellPool,
                 cache: HostWeightCache, requests: RequestTracker,
                 timeshare: Callable[[], TimeshareConfig | None]):
        self.device_id = device_id
        self.models, self.pool, self.cache, self.requests = models, pool, cache, requests
        self.timeshare = timeshare  # the device's time-sharing config now (None: off)

    def require_idle(self, entry: ModelEntry, action: str) -> None:
        n = self.requests.count(entry.name)
        if n:
            raise ModelBusyError(f"cannot {action} model {entry.name!r}: "
                                 f"{n} request(s) in flight")

    def shell_for(self, entry: ModelEntry, replace: str | None) -> EngineShell:
        sig = entry.info.swap_signature
        if replace is not None:
            other = self.models.get(replace)
            if other.state is not ACTIVE:
                raise ModelNotActiveError(f"model {replace!r} is {other.state}, not in a shell")
            shell = self.pool.get(other.shell_id)
            if shell.swap_signature != sig:
                raise IncompatibleModelError(
                    f"cannot swap {entry.name!r} ({entry.info.architecture}) into the engine "
                    f"of {replace!r} ({other.info.architecture}): tensor shapes or tokenizer differ")
            self.require_idle(other, "swap out")
            return shell
        vacant = self.pool.vacant(sig)
        if vacant is not None:
            return vacant
        same = self.pool.same_family(sig)
        for s in same:
            if not self.requests.count(s.resident):
                return s
        if same:
            raise ModelBusyError(f"every engine that {entry.name!r} can swap into is "
                                 f"serving requests: {[s.resident for s in same]}")
        raise IncompatibleModelError(
            f"no engine on device {self.device_id!r} shares the shapes and tokenizer of "
            f"{entry.name!r} ({entry.info.architecture}); load it into a new engine instead")

    async def wake(self, entry: ModelEntry) -> None:
        shell = self.pool.get(entry.shell_id)
        if shell is not None and shell.sleeping:
            cached = self.cache.get(entry.name) or self.cache.put(entry.name, entry.spec.path)
            await self.pool.wake(shell, entry.spec, str(cached.dir))
            self.models.move(entry, ACTIVE)
            entry.draining = False
            return
        await self.activate(entry)

    async def activate(self, entry: ModelEntry) -> None:
        """Parked -> active: into a vacant same-family shell if there is one
        (component reuse: milliseconds), else a new engine (tens of seconds).
        On failure the model is parked again and its reservation released."""
        vacant = self.pool.vacant(entry.info.swap_signature)
        if vacant is not None:
            await self.swap_into(vacant, entry)
            return
        self.models.move(entry, LOADING)
        try:
            shell = await self.pool.start(entry.spec, entry.info)
        except BaseException:
            self.models.move(entry, PARKED)
            raise
        entry.shell_id, entry.draining = shell.id, False
        # It founds its family's group, if the engine can swap weights in
        # place (a platform without reload_weights cannot time-share).
        if self.timeshare() is not None and shell.can_swap:
            self.pool.share(shell, lambda name: self._timeshare_switch(shell, name),
                            self._slo_of, self.timeshare())
            self.models.move(entry, TIMESHARED)
        else:
            self.models.move(entry, ACTIVE)

    async def park(self, entry: ModelEntry) -> None:
        """Active -> parked, the weights kept in host RAM, by the best
        mechanism the engine has (``cluster/engine/platform.py``). Sleep
        mode (GPU, Ascend) frees the device memory and keeps the shell for a
        fast wake. Without it (CPU) the shell is left vacant for the next
        same-family model (``drop_vacant_shells`` frees it), or closed at
        once if no model can be swapped into it."""
        self.require_idle(entry, "park")
        shell = self.pool.get(entry.shell_id)
        if shell.caps.sleep_level() is not None:
            await self.pool.sleep(shell)
        else:
            shell.resident, entry.shell_id = None, None
            if not shell.can_swap:
                self.pool.close(shell)
        self.models.move(entry, PARKED)

    async def remove(self, entry: ModelEntry, member: bool) -> None:
        """The last step of an unload (its requests already ended): free its
        shell, or leave its group (closing the group's engine if it was the
        last member), and forget its weights everywhere."""
        if member:
            group = self.pool.group(entry.info.swap_signature)
            await group.leave(entry.name)  # its turn ends; its weights are never reused
            if not self.models.members(entry.info.swap_signature):
                self.pool.close(group.shell)  # it was the last: the engine goes
        else:
            shell = self.pool.get(entry.shell_id)
            if shell is not None and shell.resident in (entry.name, None):
                self.pool.close(shell)
        await self.pool.forget_everywhere(entry.name)
        self.cache.drop(entry.name)
        self.models.remove(entry.name)

    def _slo_of(self, name: str) -> tuple[float, float]:
        entry = self.models.find(name)
        slo = entry.spec.slo if entry is not None else SLO()
        return slo.ttft_s, slo.tpot_s

    async def _timeshare_switch(self, shell: EngineShell, name: str) -> float:
        """The scheduler's switch: ``name``'s weights into the shared shell."""
        entry = self.models.find(name)
        if entry is None or entry.state is not TIMESHARED:
            raise ModelNotActiveError(f"model {name!r} is no longer on device {self.device_id!r}")
        await self.swap_into(shell, entry)
        return entry.last_swap_s or 0.0

    async def swap_into(self, shell: EngineShell, entry: ModelEntry) -> None:
        """``entry``'s weights into ``shell`` in place; the model there is
        displaced (parked, or for a time-share member: out of the engine)."""
        displaced = self.models.find(shell.resident)
        cached = self.cache.get(entry.name) or self.cache.put(entry.name, entry.spec.path)
        member = entry.state is TIMESHARED
        if displaced is not None:
            if displaced.state is TIMESHARED:
                displaced.in_engine = False
            else:
                self.models.move(displaced, PARKED)
                displaced.shell_id = None
        if member:
            entry.in_engine = True
        else:
            self.models.move(entry, LOADING)
        try:
            entry.last_swap_s = await shell.swap_in(entry.name, str(cached.dir))
        except BaseException:
            # The shell is left vacant; its old model stays parked.
            if member:
                entry.in_engine = False
            else:
                self.models.move(entry, PARKED)
            raise
        entry.shell_id, entry.draining = shell.id, False
        if not member:
            self.models.move(entry, ACTIVE)
