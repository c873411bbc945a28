"""One device's engine shells, their memory reservations, and their time-share groups.

A shell (one vLLM engine) reserves its model's weights plus KV cache from the
device budget while it lives; ``DeviceMemory`` is the check-then-act pair
that makes a refused start change nothing. The node's vLLM platform is
found before the first engine starts (``cluster/engine/platform.py``): a
device whose vLLM build is missing fails there, naming the package. On a time-sharing device each
shell also has a ``TimeShareScheduler``: the family's members take turns on it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

from cluster.catalog import ModelSpec, TimeshareConfig
from cluster.engine.checkpoint import CheckpointInfo
from cluster.engine.contract import GroupStats, ShellStats
from cluster.engine.device import DeviceMemory
from cluster.engine.platform import Platform, detect
from cluster.engine.shell import EngineShell
from cluster.engine.timeshare import TimeShareScheduler


def footprint(spec: ModelSpec) -> int:
    """Device bytes one shell of this model reserves: weights plus KV cache."""
    return spec.weights_bytes + spec.kv_cache_bytes


class ShellPool:
    def __init__(self, memory_bytes: int, kind: str, eager: bool):
        self.memory = DeviceMemory(memory_bytes)
        self.kind = kind  # the device's kind ("cpu", "cuda", "rocm", "npu", "hpu")
        # Found on the first engine start, which imports vLLM anyway.
        self.platform: Platform | None = None
        self.eager = eager  # no torch.compile (CPU: it triples every start)
        self.shells: dict[str, EngineShell] = {}
        self.groups: dict[str, TimeShareScheduler] = {}  # shell id -> its scheduler
        self._ids = itertools.count()

    def get(self, shell_id: str | None) -> EngineShell | None:
        return self.shells.get(shell_id or "")

    def __iter__(self):
        return iter(list(self.shells.values()))

    @property
    def sleep_mode(self) -> bool:
        """The platform has vLLM sleep mode (False until it is known)."""
        return self.platform is not None and self.platform.sleep_mode

    def vacant(self, signature: str) -> EngineShell | None:
        """An awake shell of this family holding no model (left by a park)
        that can take weights in place."""
        return next((s for s in self.shells.values() if s.swap_signature == signature
                     and s.resident is None and not s.sleeping and s.can_swap
                     and s.id not in self.groups), None)

    def same_family(self, signature: str) -> list[EngineShell]:
        """Awake dedicated shells a model of this family could be swapped into."""
        return [s for s in self.shells.values() if s.swap_signature == signature
                and not s.sleeping and s.can_swap and s.id not in self.groups]

    def group(self, signature: str) -> TimeShareScheduler | None:
        """The scheduler of this family's time-shared shell, if any."""
        return next((g for g in self.groups.values() if g.shell.swap_signature == signature),
                    None)

    async def start(self, spec: ModelSpec, info: CheckpointInfo) -> EngineShell:
        """A new engine for ``spec``, its memory reserved first (tens of
        seconds). On failure nothing stays reserved."""
        if self.platform is None:
            self.platform = await asyncio.to_thread(detect, self.kind)
        shell_id = f"shell{next(self._ids)}"
        self.memory.reserve(shell_id, footprint(spec), f"loading {spec.name!r}")
        try:
            shell = await EngineShell.start(shell_id, spec, info, self.sleep_mode, self.eager)
        except BaseException:
            self.memory.release(shell_id)
            raise
        self.shells[shell_id] = shell
        return shell

    def share(self, shell: EngineShell, switch: Callable[[str], Awaitable[float]],
              slo: Callable[[str], tuple[float, float]],
              config: TimeshareConfig) -> TimeShareScheduler:
        """Make ``shell`` a time-shared engine: its family takes turns on it."""
        group = self.groups[shell.id] = TimeShareScheduler(shell, switch, slo, config)
        return group

    def retune(self, config: TimeshareConfig) -> None:
        for group in self.groups.values():
            group.cfg = config

    async def sleep(self, shell: EngineShell) -> None:
        """GPU sleep mode: weights offloaded, the device memory freed."""
        await shell.sleep()
        self.memory.release(shell.id)

    async def wake(self, shell: EngineShell, spec: ModelSpec, weights_dir: str) -> None:
        """Wake a sleeping shell; ``weights_dir`` (the host cache) is where a
        level-2 sleeper reloads its weights from."""
        self.memory.reserve(shell.id, footprint(spec), f"waking {spec.name!r}")
        try:
            await shell.wake(weights_dir)
        except BaseException:
            self.memory.release(shell.id)
            raise

    def close(self, shell: EngineShell) -> None:
        group = self.groups.pop(shell.id, None)
        if group is not None:
            group.close()
        shell.shutdown()
        self.shells.pop(shell.id, None)
        self.memory.release(shell.id)

    def close_all(self) -> None:
        for shell in list(self.shells.values()):
            self.close(shell)

    async def forget_everywhere(self, model: str) -> None:
        """Free ``model``'s prepared copies (CPU fast swap) in every shell."""
        for shell in list(self.shells.values()):
            await shell.forget(model)

    def shell_stats(self) -> dict[str, ShellStats]:
        return {s.id: ShellStats(
            id=s.id, resident=s.resident, sleeping=s.sleeping,
            last_swap_path=s.last_swap_path, prepared_bytes=s.prepared_bytes(),
            mechanisms=s.caps.mechanisms(),
            engine_unfinished=s.engine.get_num_unfinished_requests() if s.engine else 0)
            for s in self.shells.values()}

    def group_stats(self) -> dict[str, GroupStats]:
        return {sid: g.stats() for sid, g in self.groups.items()}
