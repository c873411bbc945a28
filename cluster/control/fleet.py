"""How the controller reaches the machines: find devices, get their workers.

The controller takes a ``Fleet`` instead of calling Ray itself, so the same
controller, actuator and router run against real Ray (``RayFleet``) or
against in-memory fake workers in plain asyncio tests
(``cluster/testing/fake_fleet.py``).

A worker handle is anything whose methods are called as
``handle.method.remote(*args)`` and awaited: a Ray actor handle, or a fake.
"""

from __future__ import annotations

from typing import Any, Protocol

from cluster.catalog import Catalog
from cluster.control.discovery import discover_devices
from cluster.engine.device import DeviceSpec

NAMESPACE = "shoal"
WORKER_PREFIX = "shoal-worker:"


def worker_actor_name(device_id: str) -> str:
    return WORKER_PREFIX + device_id


class Fleet(Protocol):
    def discover(self, catalog: Catalog) -> list[DeviceSpec]:
        """The devices alive now."""

    def worker(self, device: DeviceSpec) -> Any:
        """The device's engine worker: the live one if there is one (a
        restarted controller finds its predecessor's), else a new one."""

    def kill(self, handle: Any) -> None:
        """Stop a worker for good (``shoal down``, a hung one, a released device)."""

    def request_capacity(self, bundles: list[dict], label_selectors: list[dict]) -> None:
        """Replace the standing request to the autoscaler: the cluster should
        fit these bundles (one per device), each on a node whose labels match
        its selector."""


class RayFleet:
    """Devices from Ray's nodes; workers as detached, named, node-pinned actors."""

    def discover(self, catalog: Catalog) -> list[DeviceSpec]:
        import ray

        return discover_devices(ray.nodes(), catalog)

    def worker(self, device: DeviceSpec) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from cluster.engine.worker import start_engine_worker

        name = worker_actor_name(device.id)
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            pass
        claim = dict(device.claim)
        opts: dict[str, Any] = {"namespace": NAMESPACE, "lifetime": "detached",
                                "get_if_exists": True}
        if device.node_id:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(device.node_id,
                                                                         soft=False)
        if "GPU" in claim:
            opts["num_gpus"] = claim.pop("GPU")
        if claim:
            opts["resources"] = claim
        return start_engine_worker(device, name=name, **opts)

    def kill(self, handle: Any) -> None:
        import ray

        ray.kill(handle, no_restart=True)

    def request_capacity(self, bundles: list[dict], label_selectors: list[dict]) -> None:
        # Ray 2.60's SDK: with autoscaler v2 (RAY_enable_autoscaler_v2=1 on
        # the head) the selectors pick node types by label; v1 drops them
        # and matches the bundles' resources alone.
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles,
                          bundle_label_selectors=label_selectors if any(label_selectors) else None)


def is_actor_death(e: BaseException) -> bool:
    """A worker (or controller) actor that is gone, not a request that failed."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(e, (RayActorError, ActorUnavailableError))
