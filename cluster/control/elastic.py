"""The controller's elastic side: the one standing request to Ray's
autoscaler, and which devices are given back.

The decisions are the pure ``ElasticPolicy``'s (``policies/elastic.py``);
this class keeps its state between rounds, turns its ``SetCapacity`` into
Ray bundles and sends them through the fleet, and answers "can this model
ever run here?" at request time.

Each device a ``SetCapacity`` counts becomes one bundle,
``{"GPU": 1, "accelerator_type:H100": 0.001}`` (the fraction, as Ray's own
``accelerator_type`` scheduling does, so that several devices fit on one
multi-GPU node), with the label selector ``{label_key: "H100"}`` for
autoscaler v2, which picks node types by their labels, plus
``{"ray.io/node-id": <node>}`` for a device in service: the autoscaler then
keeps exactly the nodes Shoal uses, and removes the one whose devices were
released (a bare count would be met by any node of the type, the idle one
included). Autoscaler v1 ignores selectors and matches the resources.
``request_resources`` replaces the previous request, so each call sends the
whole standing request.

Fault tolerance: a request that fails to send is marked unsent, so the
next round sends it again; a release that fails leaves the device in
service. A restarted controller starts with an unsent, empty state: its
first round re-asserts the request from what it sees, and devices it had
released get workers again until the policy releases them anew.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from cluster.catalog import Catalog
from cluster.control.discovery import device_resource, vendor_of
from cluster.control.view_builder import device_view, model_view
from cluster.engine.device import DeviceSpec
from cluster.errors import ModelBusyError
from policies.actions import ReleaseDevice, SetCapacity
from policies.base import Policy
from policies.capacity import NodeKind, why_unplaceable
from policies.elastic import ElasticConfig, ElasticPolicy, ElasticState, ElasticView
from policies.view import ClusterView

log = logging.getLogger(__name__)

# Share of the accelerator_type resource one device's bundle asks for: any
# positive amount selects the type, and a node declares 1 of it in all.
ACCEL_SHARE = 0.001
NODE_ID_LABEL = "ray.io/node-id"  # set by Ray on every node


def node_kinds(catalog: Catalog) -> tuple[NodeKind, ...]:
    """The accelerator types the autoscaler can add, with their profiles."""
    if catalog.capacity is None:
        return ()
    kinds = []
    for t, e in sorted(catalog.capacity.accelerators.items()):
        prof = catalog.discovery.accelerators[t]  # the catalog checked it exists
        kinds.append(NodeKind(t, vendor_of(device_resource(t), t)[0], prof.memory_bytes,
                              prof.speed, prof.cost_per_hour, e.max_devices))
    return tuple(kinds)


class Elastic:
    """Also the actuator's ``ElasticHooks``: it executes the elastic actions."""

    RPC_TIMEOUT_S = 10.0

    def __init__(self, catalog: Catalog, placement: Policy, fleet,
                 worker: Callable[[str], Any], drop_worker: Callable[[str], Any],
                 discover: Callable[[], Awaitable[None]]):
        cap = catalog.capacity
        self.enabled = cap is not None  # without it: nothing sent, nothing released
        self.kinds = node_kinds(catalog)
        self.label_key = cap.label_key if cap else None
        config = ElasticConfig(release=False) if cap is None else ElasticConfig(
            shrink_delay_s=cap.shrink_delay_s, release_idle_s=cap.release_idle_s,
            min_node_lifetime_s=cap.min_node_lifetime_s)
        self.policy = ElasticPolicy(placement, self.kinds, config)
        self.fleet = fleet
        self.worker = worker  # device -> its engine worker (raises if none)
        self.drop_worker = drop_worker  # forget a device's worker; returns the handle
        self.discover = discover  # re-read devices, start workers where missing
        self.state = ElasticState()
        self.sent: dict = {"bundles": [], "label_selectors": []}  # last request sent

    @property
    def released(self) -> frozenset[str]:
        return self.state.released

    def decide(self, view: ClusterView, spare: list[DeviceSpec], now: float) -> list:
        """One round: the placement policy's actions plus the elastic ones."""
        actions, self.state = self.policy.decide(
            ElasticView(view, tuple(device_view(d) for d in spare)), self.state, now)
        return actions

    def bundles(self, a: SetCapacity) -> tuple[list[dict], list[dict]]:
        """Ray bundles and their label selectors, one per device."""
        bundles, selectors = [], []
        for kind, node, count in a.devices:
            selector = {self.label_key: kind} if self.label_key else {}
            if node is not None and self.label_key:
                selector[NODE_ID_LABEL] = node
            for _ in range(count):
                bundles.append({device_resource(kind): 1, f"accelerator_type:{kind}": ACCEL_SHARE})
                selectors.append(dict(selector))
        return bundles, selectors

    def set_capacity(self, a: SetCapacity) -> dict:
        bundles, selectors = self.bundles(a)
        if self.enabled:
            self.fleet.request_capacity(bundles, selectors)
        self.sent = {"bundles": bundles, "label_selectors": selectors}
        return {"devices": [list(d) for d in a.devices], "sent": self.enabled}

    async def release_device(self, device: str) -> dict:
        """Stop an empty device's worker (``ReleaseDevice``): its accelerator
        is free, so its node can go idle and the autoscaler remove it."""
        w = self.worker(device)
        held = (await asyncio.wait_for(w.stats.remote(), self.RPC_TIMEOUT_S)).models
        if held:  # the round unloaded its parked copies; whatever is here came since
            raise ModelBusyError(f"device {device!r} is not empty: {sorted(held)}")
        self.drop_worker(device)
        try:
            await asyncio.wait_for(w.shutdown.remote(), self.RPC_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - it is being killed anyway
            pass
        self.fleet.kill(w)
        return {"device": device}

    async def reclaim_device(self, device: str) -> dict:
        """Back into service (``ReclaimDevice``): the state no longer lists it
        as released, so discovery gives it a worker now."""
        await self.discover()
        return {"device": device}

    def failed(self, a) -> None:
        """An elastic action failed: undo what the state assumed."""
        if isinstance(a, SetCapacity):
            self.state = replace(self.state, request=None)  # resend next round
        elif isinstance(a, ReleaseDevice):
            self.state = replace(self.state, released=self.state.released - {a.device})

    def why_unplaceable(self, spec, devices: list[DeviceSpec]) -> str | None:
        """Why ``spec`` can never run here (None: it can, or may). Only with
        capacity configured: otherwise what the autoscaler adds is unknown."""
        if not self.enabled:
            return None
        return why_unplaceable(model_view(spec, []), [device_view(d) for d in devices],
                               self.kinds)

    def status(self) -> dict:
        s = self.state
        return {
            "enabled": self.enabled, "addable": [k.name for k in self.kinds],
            "standing": dict(s.standing), **self.sent, "wants": self.wants(),
            "unmet": dict(s.unmet), "released": sorted(s.released),
            "first_seen": dict(s.first_seen), "empty_since": dict(s.empty_since)}

    def wants(self) -> list[dict]:
        """The round's unmet device wants, as ``capacity_requests`` in status."""
        return [{"for_model": w.for_model, "memory_bytes": w.memory_bytes,
                 "vendors": list(w.vendors), "accelerators": list(w.accelerators),
                 "fast": w.fast} for w in self.state.wants]
