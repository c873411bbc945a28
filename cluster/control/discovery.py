"""Devices from Ray cluster resources.

Every alive node's ``GPU`` (NVIDIA/AMD/Intel GPUs), ``NPU`` (Ascend) and
``HPU`` (Intel Gaudi) units become one device each; its
``accelerator_type:<T>`` resource names the type. CPU devices are declared in the catalog (a memory slice of one node).
Pure function of ``ray.nodes()`` output, so it is tested without a cluster.
"""

from __future__ import annotations

import logging

from cluster.catalog import Catalog, CPUDevice
from cluster.engine.device import DeviceSpec

log = logging.getLogger(__name__)

ACCEL_PREFIX = "accelerator_type:"


DEVICE_RESOURCES = ("GPU", "NPU", "HPU")


def device_resource(accel: str) -> str:
    """The Ray resource one device of accelerator type ``accel`` is counted in."""
    a = accel.lower()
    if a.startswith("ascend"):
        return "NPU"
    if a.startswith("intel-gaudi"):
        return "HPU"
    return "GPU"


def vendor_of(resource: str, accel: str | None) -> tuple[str, str]:
    """(vendor, engine kind) for a device unit; Ray names AMD/Intel types by prefix."""
    if resource == "NPU":
        return "huawei", "npu"
    if resource == "HPU":
        return "intel", "hpu"
    a = (accel or "").lower()
    if a.startswith("amd"):
        return "amd", "rocm"
    if a.startswith("intel"):
        return "intel", "xpu"
    return "nvidia", "cuda"


def node_matches(node: dict, selector: str) -> bool:
    """A catalog ``node`` value names a node by id, IP or a custom resource."""
    return selector in (node.get("NodeID"), node.get("NodeManagerAddress")) \
        or selector in node.get("Resources", {})


def _short(node_id: str) -> str:
    """A node's short name in device ids: the end of its id, not the start.
    Ray's ids are random throughout, but the fake multi-node provider's all
    begin with the same 51 "f"s and differ only at the end."""
    return node_id[-8:]


def _head(nodes: list[dict]) -> dict:
    for n in nodes:
        if "node:__internal_head__" in n.get("Resources", {}):
            return n
    return nodes[0]


def discover_devices(nodes: list[dict], catalog: Catalog) -> list[DeviceSpec]:
    alive = [n for n in nodes if n.get("Alive", n.get("alive", False))]
    if not alive:
        return []
    disc = catalog.discovery
    devices: list[DeviceSpec] = []
    for node in sorted(alive, key=lambda n: n["NodeID"]):
        res = node.get("Resources", {})
        accel = next((k[len(ACCEL_PREFIX):] for k in sorted(res) if k.startswith(ACCEL_PREFIX)), None)
        prof = disc.accelerators.get(accel or "")
        for resource in DEVICE_RESOURCES:
            for i in range(int(res.get(resource, 0))):
                vendor, kind = vendor_of(resource, accel)
                devices.append(DeviceSpec(
                    id=f"{_short(node['NodeID'])}/{resource.lower()}{i}",
                    kind="cpu" if disc.emulate_accelerators_on_cpu else kind,
                    memory_bytes=prof.memory_bytes if prof else disc.default_accelerator_memory_bytes,
                    vendor=vendor, accelerator_type=accel, node_id=node["NodeID"],
                    speed=prof.speed if prof else 1.0,
                    cost_per_hour=prof.cost_per_hour if prof else 0.0,
                    claim=((resource, 1.0),), timeshare=prof.timeshare if prof else None))
    for cpu in catalog.cpu_devices:
        dev = _cpu_device(cpu, alive)
        if dev is not None:
            devices.append(dev)
    return devices


def _cpu_device(cpu: CPUDevice, alive: list[dict]) -> DeviceSpec | None:
    if cpu.node is None:
        node = _head(alive)
    else:
        node = next((n for n in alive if node_matches(n, cpu.node)), None)
        if node is None:  # its node is down or not yet up: retried next discovery
            log.warning("cpu_devices %r: no alive Ray node matches node=%r "
                        "(by id, IP or custom resource)", cpu.id, cpu.node)
            return None
    return DeviceSpec(id=cpu.id, kind="cpu", memory_bytes=cpu.memory_bytes, vendor=cpu.vendor,
                      accelerator_type=cpu.accelerator_type, node_id=node["NodeID"],
                      speed=cpu.speed, cost_per_hour=cpu.cost_per_hour,
                      timeshare=cpu.timeshare)
