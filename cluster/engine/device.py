"""What one engine worker owns: a device and its memory budget.

A device is one GPU, or a CPU "device" (a declared slice of host memory).
``DeviceMemory`` keeps the accounting as a check-then-act pair so a refused
reservation never changes state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.catalog import TimeshareConfig
from cluster.errors import OverBudgetError


@dataclass(frozen=True)
class DeviceSpec:
    id: str  # unique in the cluster, e.g. "node1/gpu0" or "cpu0"
    kind: str  # vLLM platform: "cpu", "cuda", "rocm", "npu" (Ascend), "hpu" (Gaudi), "xpu"
    memory_bytes: int  # budget engines on this device may reserve
    vendor: str = "cpu"  # "nvidia", "amd", "huawei", "intel", "cpu"
    accelerator_type: str | None = None  # Ray's string, e.g. "H100"
    node_id: str | None = None  # Ray node the worker is pinned to
    speed: float = 1.0  # relative decode throughput, for placement
    cost_per_hour: float = 0.0
    # Ray resources the worker actor claims, e.g. {"GPU": 1}; none for CPU.
    claim: tuple[tuple[str, float], ...] = ()
    # Same-family models take turns on one engine (cluster/engine/timeshare.py); None = off.
    timeshare: TimeshareConfig | None = None


@dataclass
class DeviceMemory:
    """Reservations against a fixed budget. Invariant: used_bytes <= budget_bytes."""

    budget_bytes: int
    reservations: dict[str, int] = field(default_factory=dict)  # holder -> bytes

    @property
    def used_bytes(self) -> int:
        return sum(self.reservations.values())

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def can_reserve(self, nbytes: int) -> bool:
        return nbytes <= self.free_bytes

    def reserve(self, holder: str, nbytes: int, what: str) -> None:
        if holder in self.reservations:
            raise ValueError(f"{holder} already holds a reservation")
        if not self.can_reserve(nbytes):
            raise OverBudgetError(
                f"{what} needs {nbytes / 2**20:.1f} MiB but the device has "
                f"{self.free_bytes / 2**20:.1f} MiB free of {self.budget_bytes / 2**20:.1f} MiB "
                f"(held: {', '.join(f'{k}={v / 2**20:.1f} MiB' for k, v in self.reservations.items()) or 'nothing'})"
            )
        self.reservations[holder] = nbytes

    def release(self, holder: str) -> None:
        self.reservations.pop(holder, None)
