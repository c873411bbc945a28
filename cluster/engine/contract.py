"""The engine worker's contract with the control plane: what ``stats()`` returns.

Everything here crosses a ``.remote``: frozen dataclasses and an ``Enum``,
so a reader, a type checker and a tool can follow a call from the
controller into a worker. The worker alone decides whether a copy takes
requests (``ModelStatus.routable``); the controller only overlays
"unrouted" while one of its actions takes the copy out.

Model states on one device::

    loading --> active <--> parked
       |          |           |
       +------> unloading <---+      (then gone)
       |            ^
       +--> timeshared                (loading -> timeshared: its engine
                                       founds the family's shared group)

    timeshared: a member of a time-shared engine (the device's family
    group): it serves whether its weights are in the engine right now or
    not; its scheduler swaps it in for its turns (``in_engine`` says which).
    A model joining an existing group enters as timeshared directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class ModelState(str, Enum):
    # Its engine is starting, or its weights are being swapped in.
    LOADING = "loading"
    # Its weights are in an engine shell of its own: it serves.
    ACTIVE = "active"
    # Weights only in the host cache (CPU) or a sleeping engine (GPU): it
    # serves again after a swap or wake, never after a disk read.
    PARKED = "parked"
    # A time-share member: serves while parked; the device takes turns.
    TIMESHARED = "timeshared"
    # Leaving the device: its requests are being ended.
    UNLOADING = "unloading"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TurnStats:
    """One time-share member's requests by where they are, and its estimates."""

    queued: int  # waiting for a turn (new or preempted)
    in_engine: int  # running in the shared engine now
    preempted: int  # queued after having run: they resume by re-prefill
    step_s: float | None  # measured decode step of its batch (None: not yet)
    switch_s: float | None  # measured swap + re-prefill cost of one switch
    quota_s: float  # the last turn quota it was given ("aegaeon")


@dataclass(frozen=True)
class GroupStats:
    """One time-shared engine: its scheduler's totals since it started."""

    discipline: str  # "token", "aegaeon" or "request"
    resident: str | None  # the model whose weights are in the engine
    current: str | None  # the model whose turn it is (None between turns)
    switches: int  # weight swaps between members
    preemptions: int  # engine requests cancelled at the end of a turn
    swap_s: float  # seconds spent swapping weights
    restart_s: float  # seconds from a swap to the first resumed token
    busy_s: float  # seconds in turns, switches included
    models: dict[str, TurnStats] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelStatus:
    """One model's copy on one device."""

    name: str
    family: str
    state: ModelState
    # Takes requests here now: decided by the worker alone (active or a
    # time-share member, and not draining).
    routable: bool
    # Its weights are in an engine right now (active, or the member whose
    # turn it is): what the policy counts as device memory in use.
    in_engine: bool
    draining: bool  # evacuated: refuses new requests until unloaded
    shell: str | None  # the engine shell holding (or sleeping with) its weights
    architecture: str
    weights_bytes: int
    kv_cache_bytes: int
    running: int  # requests past their first token
    waiting: int  # requests waiting for their first token
    tokens_per_s: float  # generated over the last few seconds
    last_swap_s: float | None  # its last in-place swap (None: never swapped)
    # Smoothed latencies of its finished requests here (None until measured):
    # what shows a time-shared device overloaded.
    ttft_s: float | None = None
    tpot_s: float | None = None
    turns: TurnStats | None = None  # set for time-share members

    @property
    def timeshared(self) -> bool:
        return self.state is ModelState.TIMESHARED

    @property
    def inflight(self) -> int:
        return self.running + self.waiting


@dataclass(frozen=True)
class ShellStats:
    """One engine shell (one vLLM engine)."""

    id: str
    resident: str | None  # the model whose weights it holds
    sleeping: bool  # GPU sleep mode
    last_swap_path: str | None  # "prepared" or "reload" (None: never swapped)
    prepared_bytes: dict[str, int]  # host RAM of each model kept prepared in it
    engine_unfinished: int  # vLLM's own count: shows aborted requests are gone
    # (park, swap) mechanisms this engine really has, best first
    # (cluster/engine/platform.py): e.g. ("host-cache", "prepared") on CPU.
    mechanisms: tuple[str, str] | None = None


@dataclass(frozen=True)
class DeviceStats:
    id: str
    kind: str  # "cpu", "cuda", "rocm", ...
    vendor: str
    accelerator_type: str | None
    memory_used_bytes: int
    memory_budget_bytes: int
    host_cache_bytes: int
    sleep_mode: bool
    # The node's vLLM build, once the first engine found it (None before).
    platform: str | None = None


@dataclass(frozen=True)
class WorkerStats:
    """Everything the controller knows of a device comes from here: the
    workers are the source of truth, so a restarted controller rebuilds its
    state from these alone."""

    device: DeviceStats
    shells: dict[str, ShellStats]
    models: dict[str, ModelStatus]
    groups: dict[str, GroupStats]  # shell id -> its time-sharing scheduler
    tokens_per_s: float


@dataclass(frozen=True)
class Unloaded:
    """What ``unload`` reports."""

    name: str
    aborted_requests: int  # in-flight requests ended with an error
