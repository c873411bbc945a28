"""The models resident on one device, and the rules of their state machine.

Pure bookkeeping: no Ray, no vLLM, no I/O, so it is unit-tested on its own
(``tests/test_registry.py``). The engine worker changes a model's state only
through ``ModelRegistry.move``, which refuses a transition the diagram in
``cluster/engine/contract.py`` does not have and leaves the entry as it was.

Invariant: a model is in at most one state at a time, and only members of a
time-shared engine are ``TIMESHARED``; routability is derived from the state
and the draining flag, never stored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from cluster.catalog import ModelSpec
from cluster.engine.checkpoint import CheckpointInfo
from cluster.engine.contract import ModelState
from cluster.errors import ShoalError, UnknownModelError

LOADING, ACTIVE, PARKED, TIMESHARED, UNLOADING = (
    ModelState.LOADING, ModelState.ACTIVE, ModelState.PARKED, ModelState.TIMESHARED,
    ModelState.UNLOADING)

# state -> the states it may move to. A model enters as LOADING (a new
# engine), PARKED (host cache only) or TIMESHARED (joins its family's group).
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    # Started (on a time-sharing device its engine founds the family's
    # group), or failed back to parked.
    LOADING: frozenset({ACTIVE, TIMESHARED, PARKED, UNLOADING}),
    ACTIVE: frozenset({PARKED, UNLOADING}),  # parked, swapped out, or leaving
    PARKED: frozenset({LOADING, ACTIVE, UNLOADING}),  # swapped in / woken, or leaving
    TIMESHARED: frozenset({UNLOADING}),  # its scheduler swaps it; it never parks
    UNLOADING: frozenset(),
}
ENTRY_STATES = frozenset({LOADING, PARKED, TIMESHARED})


class InvalidTransitionError(ShoalError):
    """A bug in the worker: a state change the state machine does not allow."""

    code = "invalid_state_transition"


@dataclass
class ModelEntry:
    spec: ModelSpec
    info: CheckpointInfo
    state: ModelState
    shell_id: str | None = None  # shell holding (or sleeping with) the weights
    # The weights are in an engine now (for a member: it is being swapped in
    # or its turn is on). Kept by the worker's swap, read by stats.
    in_engine: bool = False
    last_swap_s: float | None = None
    draining: bool = False  # evacuated: takes no new requests (stale routes)
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def routable(self) -> bool:
        """Takes requests here now: active, or a time-share member."""
        return not self.draining and self.state in (ACTIVE, TIMESHARED)


class ModelRegistry:
    def __init__(self, device_id: str):
        self.device_id = device_id
        self._entries: dict[str, ModelEntry] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownModelError(f"model {name!r} is not loaded on device {self.device_id!r}; "
                                    f"loaded: {self.names()}")
        return entry

    def find(self, name: str | None) -> ModelEntry | None:
        return self._entries.get(name) if name is not None else None

    def add(self, spec: ModelSpec, info: CheckpointInfo, state: ModelState) -> ModelEntry:
        if spec.name in self._entries:
            raise InvalidTransitionError(f"model {spec.name!r} is already registered")
        if state not in ENTRY_STATES:
            raise InvalidTransitionError(f"a model cannot enter as {state}")
        entry = self._entries[spec.name] = ModelEntry(spec, info, state,
                                                      in_engine=state is LOADING)
        return entry

    def move(self, entry: ModelEntry, state: ModelState) -> None:
        """Change ``entry``'s state, or raise and leave it as it was."""
        if state is entry.state:
            return
        if state not in TRANSITIONS[entry.state]:
            raise InvalidTransitionError(
                f"model {entry.name!r} cannot go from {entry.state} to {state}")
        entry.state = state
        if state is not TIMESHARED:
            entry.in_engine = state in (ACTIVE, LOADING)

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def members(self, signature: str) -> list[ModelEntry]:
        """The time-share members of one family (same swap signature)."""
        return [e for e in self._entries.values()
                if e.state is TIMESHARED and e.info.swap_signature == signature]
