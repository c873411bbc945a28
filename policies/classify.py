"""Hot, cold or idle: how a model stands this round, and who outranks whom.

Classification is computed once per ``decide`` from the input view, so every
phase of a round agrees on it. Its only memory is the cluster itself: a hot
model that got a device to itself stays hot down to ``cold_rate``
(hysteresis), which is why policies need no state of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.choose import IN_MEMORY, alone_on
from policies.view import ClusterView, Demand, ModelView


def has_demand(d: Demand) -> bool:
    """Anything waiting, running or arriving: the model wants an active copy."""
    return d.queue > 0 or d.inflight > 0 or d.rate > 0


def demand_key(view: ClusterView, name: str) -> tuple[float, int]:
    """How much a model is wanted, for "strictly less wanted than" tests.

    Rate first: a steady stream outranks a burst that happens to be queued
    now, so two models cannot take turns evicting each other as their queues
    fill and drain (no ping-pong). The queue only breaks exact rate ties.
    """
    d = view.demand_of(name)
    return (d.rate, d.queue)


def eviction_order(view: ClusterView, name: str) -> tuple[float, float, str]:
    """Who goes first when something must give way: lowest rate, then the
    longest unused, then by name so the choice is deterministic."""
    d = view.demand_of(name)
    return (d.rate, d.last_used, name)


def priority_order(view: ClusterView, name: str) -> tuple[float, int, str]:
    """Who is served first within a round: the reverse of ``demand_key``.
    Processing in this order means a model evicted this round (always less
    wanted than its evictor) still gets its own turn later in the round."""
    rate, queue = demand_key(view, name)
    return (-rate, -queue, name)


def is_idle(view: ClusterView, m: ModelView, now: float, idle_s: float) -> bool:
    """Nothing queued or running anywhere and no arrival for ``idle_s``."""
    d = view.demand_of(m.name)
    if d.queue or d.inflight or any(p.inflight for p in m.placements):
        return False
    return now - d.last_used >= idle_s


@dataclass(frozen=True)
class Heat:
    """The round's classification, from the input view."""

    hot: frozenset[str]  # get replicas, fast devices, a device of their own
    idle: frozenset[str]  # scale to zero (down to min_replicas) this round

    @classmethod
    def of(cls, view: ClusterView, now: float, hot_rate: float, cold_rate: float,
           idle_s: float) -> Heat:
        hot, idle = set(), set()
        for m in view.models:
            if is_idle(view, m, now, idle_s):
                idle.add(m.name)
                continue
            rate = view.demand_of(m.name).rate
            if rate >= hot_rate or (rate >= cold_rate and alone_on(view, m)):
                hot.add(m.name)
        return cls(frozenset(hot), frozenset(idle))

    def hot_devices(self, view: ClusterView) -> frozenset[str]:
        """Devices where a hot model holds memory (in ``view``, which may be a plan)."""
        return frozenset(d for name in self.hot for d in view.model(name).on(*IN_MEMORY))
