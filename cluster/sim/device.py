"""One simulated device: memory, and the sharing of its compute and host link.

The engines on a device (several families' engines, or MuxServe's models
side by side) share it by processor sharing: k engines computing at once
each progress at 1/k of full speed, and k weight switches share the host
link the same way. When k changes, every engine affected counts its progress
at the old rate and goes on at the new (``SimEngine.resync``). Compute and
link are separate: one engine's switch does not slow another's decoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.sim.costmodel import CostModel
from cluster.sim.profiles import DeviceProfile
from policies.view import DeviceView

if TYPE_CHECKING:
    from cluster.sim.engine import SimEngine


class SimDevice:
    def __init__(self, did: str, profile: DeviceProfile, cost: CostModel, timeshare: bool,
                 reference_bandwidth: float):
        self.id, self.profile, self.cost, self.timeshare = did, profile, cost, timeshare
        self.engines: list["SimEngine"] = []
        self.parked: set[str] = set()  # models staged in this node's host cache only
        self._users: dict[str, list["SimEngine"]] = {"compute": [], "link": []}
        # What the policies see: decode speed relative to the reference device
        # (decode is bandwidth-bound), and the price.
        self.view = DeviceView(
            id=did, node=did, vendor=profile.vendor, accelerator_type=profile.accelerator_type,
            memory_bytes=profile.memory_bytes,
            speed=round(profile.memory_bandwidth_bytes_per_s / reference_bandwidth, 3),
            cost_per_hour=profile.cost_per_hour)

    @property
    def used_bytes(self) -> int:
        return sum(e.reserve_bytes for e in self.engines)

    @property
    def free_bytes(self) -> int:
        return self.profile.memory_bytes - self.used_bytes

    def join(self, engine: "SimEngine", resource: str, now: float) -> None:
        users = self._users[resource]
        users.append(engine)
        self._share(users, now)

    def leave(self, engine: "SimEngine", resource: str, now: float) -> None:
        users = self._users[resource]
        if engine in users:
            users.remove(engine)
            self._share(users, now)

    @staticmethod
    def _share(users: list["SimEngine"], now: float) -> None:
        rate = 1.0 / len(users) if users else 1.0
        for e in users:
            e.resync(now, rate)
