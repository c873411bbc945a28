"""What a policy sees: an immutable snapshot of devices, models and demand.

The live controller builds it from engine-worker stats; the simulator builds
it from its cluster model. Policies get nothing else, so the two run the very
same decisions. Plain frozen dataclasses: no Ray, no vLLM, cheap to copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

LOADING, ACTIVE, PARKED = "loading", "active", "parked"


@dataclass(frozen=True)
class DeviceView:
    id: str
    node: str
    vendor: str  # "nvidia", "amd", "huawei", "intel", "cpu"
    accelerator_type: str | None  # Ray's string ("H100"), None for plain CPU
    memory_bytes: int
    speed: float = 1.0  # relative decode throughput; 1.0 = the reference device
    cost_per_hour: float = 0.0


@dataclass(frozen=True)
class Placement:
    """One copy of a model on a device.

    ``loading`` and ``active`` hold device memory (weights + KV); ``parked``
    holds only host memory on the device's node (CPU host cache, or a GPU
    engine in sleep mode) and becomes active by a swap or wake.
    """

    device: str
    state: str
    inflight: int = 0  # requests running or waiting on this copy
    # Served by the device's token-level time-sharing: takes requests while
    # parked, its turns decided on the device (cluster/engine/timeshare.py).
    timeshared: bool = False
    # The copy's measured latencies (smoothed; None until measured): what
    # shows a time-shared device overloaded.
    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass(frozen=True)
class ModelView:
    name: str
    family: str  # same family = same shapes + tokenizer = swappable in place
    weights_bytes: int
    kv_cache_bytes: int
    ttft_slo_s: float = 10.0
    tpot_slo_s: float = 0.1
    allowed_vendors: tuple[str, ...] = ()  # empty = any
    allowed_accelerators: tuple[str, ...] = ()  # empty = any
    min_replicas: int = 0
    max_replicas: int = 1
    pinned: bool = False  # never evicted, parked by policy or migrated
    placements: tuple[Placement, ...] = ()

    @property
    def footprint(self) -> int:
        """Device bytes one active copy needs."""
        return self.weights_bytes + self.kv_cache_bytes

    def allowed_on(self, device: DeviceView) -> bool:
        if self.allowed_vendors and device.vendor not in self.allowed_vendors:
            return False
        if self.allowed_accelerators and device.accelerator_type not in self.allowed_accelerators:
            return False
        return True

    def on(self, *states: str) -> tuple[str, ...]:
        """Device ids holding this model in one of ``states``."""
        return tuple(p.device for p in self.placements if p.state in states)

    def placement(self, device: str) -> Placement | None:
        for p in self.placements:
            if p.device == device:
                return p
        return None


@dataclass(frozen=True)
class Demand:
    rate: float = 0.0  # smoothed arrivals per second
    queue: int = 0  # requests waiting for the model to become active
    inflight: int = 0  # requests being served by its active copies
    last_used: float = float("-inf")  # time of the latest arrival


NO_DEMAND = Demand()


@dataclass(frozen=True)
class ClusterView:
    devices: tuple[DeviceView, ...]
    models: tuple[ModelView, ...]
    demand: Mapping[str, Demand] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "demand", MappingProxyType(dict(self.demand)))

    # Lookups by id, built on first use: a policy asks them thousands of times
    # per round, and a view never changes (``plan.apply`` makes a new one).
    @cached_property
    def _devices_by_id(self) -> dict[str, DeviceView]:
        index: dict[str, DeviceView] = {}
        for d in self.devices:
            index.setdefault(d.id, d)
        return index

    @cached_property
    def _models_by_name(self) -> dict[str, ModelView]:
        index: dict[str, ModelView] = {}
        for m in self.models:
            index.setdefault(m.name, m)
        return index

    @cached_property
    def _copies_by_device(self) -> dict[str, list[tuple[ModelView, str]]]:
        """device -> (model, state) of each copy there, in ``models`` order."""
        index: dict[str, list[tuple[ModelView, str]]] = {}
        for m in self.models:
            for p in m.placements:
                index.setdefault(p.device, []).append((m, p.state))
        return index

    def device(self, device_id: str) -> DeviceView:
        try:
            return self._devices_by_id[device_id]
        except KeyError:
            raise KeyError(device_id) from None

    def model(self, name: str) -> ModelView:
        try:
            return self._models_by_name[name]
        except KeyError:
            raise KeyError(name) from None

    def demand_of(self, name: str) -> Demand:
        return self.demand.get(name, NO_DEMAND)

    def residents(self, device_id: str, *states: str) -> tuple[ModelView, ...]:
        """Models with a copy on ``device_id`` (in ``states``, default any)."""
        return tuple(m for m, state in self._copies_by_device.get(device_id, ())
                     if not states or state in states)

    @cached_property
    def _used_by_device(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for device_id, copies in self._copies_by_device.items():
            used[device_id] = sum(m.footprint for m, state in copies
                                  if state in (LOADING, ACTIVE))
        return used

    def used_bytes(self, device_id: str) -> int:
        return self._used_by_device.get(device_id, 0)

    def free_bytes(self, device_id: str) -> int:
        return self.device(device_id).memory_bytes - self.used_bytes(device_id)
