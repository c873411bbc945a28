"""Two reference policies to measure the default one against.

- ``DedicatedPolicy``: the classic one-model-per-device deployment. Every
  wanted model gets devices of its own and keeps them; no sharing, no
  swapping, no scale to zero.
- ``LRUScaleToZeroPolicy``: request-level scale to zero in the style of
  ServerlessLLM. A model with waiting requests gets an engine of its own on
  any device with room, evicting the least recently used idle model if
  needed; models unused for ``keep_alive_s`` are unloaded. No same-family
  swaps and no parking.

Both are stateless like the default policy and plan through ``Planner``.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.actions import Action, Load, Unload, Wake
from policies.acquire import capacity_request
from policies.choose import IN_MEMORY, fits, in_memory, is_empty
from policies.classify import has_demand, priority_order
from policies.plan import Planner
from policies.view import ACTIVE, PARKED, ClusterView, DeviceView, ModelView


def _smallest_first(d: DeviceView) -> tuple:
    return (d.memory_bytes, d.cost_per_hour, d.id)


class DedicatedPolicy:
    """Each model with demand or ``min_replicas`` holds whole devices:
    max(1, min_replicas) copies, each on a device nobody else uses (the
    smallest that fits). Never shares, never unloads; with no empty allowed
    device it asks for capacity."""

    name = "dedicated"

    def decide(self, view: ClusterView, now: float) -> list[Action]:
        plan = Planner(view)
        for m in sorted(view.models, key=lambda m: priority_order(view, m.name)):
            want = max(1 if has_demand(view.demand_of(m.name)) else 0, m.min_replicas)
            while len(plan.view.model(m.name).on(*IN_MEMORY)) < want:
                if not self._place(plan, plan.view.model(m.name)):
                    plan.do(capacity_request(m, "dedicated: no empty device fits"))
                    break
        return plan.actions

    @staticmethod
    def _place(plan: Planner, m: ModelView) -> bool:
        view = plan.view
        empty = [d for d in view.devices if is_empty(view, d.id) and m.allowed_on(d)
                 and d.memory_bytes >= m.footprint
                 and (m.placement(d.id) is None or m.placement(d.id).state == PARKED)]
        if not empty:
            return False
        d = min(empty, key=_smallest_first)
        why = f"{m.name}: a device of its own"
        plan.do(Wake(m.name, d.id, reason=why) if m.placement(d.id) else
                Load(m.name, d.id, reason=why))
        return True


@dataclass(frozen=True)
class LRUScaleToZeroPolicy:
    """Load on request, evict least recently used, unload after keep-alive."""

    # Unload a model once nothing is queued or running and no request came for this long.
    keep_alive_s: float = 300.0

    name = "lru"

    def __post_init__(self):
        if self.keep_alive_s < 0:
            raise ValueError(f"keep_alive_s must be >= 0, got {self.keep_alive_s}")

    def decide(self, view: ClusterView, now: float) -> list[Action]:
        plan = Planner(view)
        for m in sorted(view.models, key=lambda m: m.name):
            if self._expired(view, m, now):
                for d in sorted(m.on(ACTIVE, PARKED)):
                    plan.do(Unload(m.name, d, reason=f"{m.name}: keep-alive over"))
        waiting = [m for m in view.models if view.demand_of(m.name).queue > 0]
        waiting.sort(key=lambda m: (-view.demand_of(m.name).queue, m.name))
        for m in waiting:
            m = plan.view.model(m.name)
            if not m.on(*IN_MEMORY) and not self._start(plan, m):
                plan.do(capacity_request(m, "lru: nothing to evict"))
        return plan.actions

    def _expired(self, view: ClusterView, m: ModelView, now: float) -> bool:
        d = view.demand_of(m.name)
        return (not m.pinned and m.min_replicas == 0 and bool(m.placements)
                and not (d.queue or d.inflight or any(p.inflight for p in m.placements))
                and now - d.last_used >= self.keep_alive_s)

    def _start(self, plan: Planner, m: ModelView) -> bool:
        """An engine for ``m``: wake a parked copy with room, load on the
        tightest device with room, or evict LRU idle models to make room."""
        view = plan.view
        usable = [d for d in view.devices if m.allowed_on(d)
                  and (m.placement(d.id) is None or m.placement(d.id).state == PARKED)]
        roomy = [d for d in usable if fits(view, m, d)]
        if roomy:
            d = min(roomy, key=lambda d: (m.placement(d.id) is None,
                                          view.free_bytes(d.id), d.id))
            plan.do(self._engine(m, d.id, "room"))
            return True
        best = None
        for d in usable:
            victims = self._lru_victims(view, m, d)
            if victims is not None:
                key = (max(view.demand_of(v.name).last_used for v in victims), len(victims), d.id)
                if best is None or key < best[0]:
                    best = (key, d, victims)
        if best is None:
            return False
        _, d, victims = best
        plan.do(*[Unload(v.name, d.id, reason=f"lru: room for {m.name}") for v in victims],
                self._engine(m, d.id, "room made"))
        return True

    @staticmethod
    def _engine(m: ModelView, device: str, why: str) -> Action:
        p = m.placement(device)
        if p is not None:
            return Wake(m.name, device, reason=f"{m.name} requested; {why}")
        return Load(m.name, device, reason=f"{m.name} requested; {why}")

    @staticmethod
    def _lru_victims(view: ClusterView, m: ModelView, d: DeviceView) -> list[ModelView] | None:
        """Idle models on ``d``, least recently used first, until ``m`` fits."""
        def idle(v: ModelView) -> bool:
            dv, p = view.demand_of(v.name), v.placement(d.id)
            return (v.name != m.name and not v.pinned and p.state == ACTIVE and p.inflight == 0
                    and dv.queue == 0 and len(v.on(ACTIVE)) > v.min_replicas)

        need = m.footprint - view.free_bytes(d.id)
        chosen = []
        for v in sorted(filter(idle, in_memory(view, d.id)),
                        key=lambda v: (view.demand_of(v.name).last_used, v.name)):
            if need <= 0:
                break
            chosen.append(v)
            need -= v.footprint
        return chosen if need <= 0 and chosen else None
