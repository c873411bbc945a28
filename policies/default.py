"""Shoal's default placement policy: hot models get fast devices and
replicas, cold ones share engines by family, idle ones scale to zero.

One round (``decide``) runs five phases in order over one ``Planner``, so
later phases see what earlier ones did and nothing is double-booked:

1. idle models scale to zero (down to ``min_replicas``);
2. replicas that demand no longer needs scale in (hysteresis);
3. every wanted model without a copy in memory gets one (``acquire``),
   most wanted first;
4. hot models scale out until their capacity covers their rate;
5. only if 1-4 did nothing: consolidation (``consolidate``).

Invariant: the policy keeps no state between rounds. Everything it
remembers (who is hot, who is where) is read back from the view, so the
controller and the simulator can call the same object, and the same
(view, now) always gives the same actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from policies.acquire import acquire, capacity_request, device_key
from policies.actions import Action, ScaleIn, ScaleOut, Unload, Wake
from policies.choose import (IN_MEMORY, capacity_rps, cheap_first, fits, swap_ready,
                             timeshare_served)
from policies.classify import Heat, has_demand, priority_order
from policies.consolidate import empty_one_device, give_hot_whole_devices
from policies.plan import Planner
from policies.view import ACTIVE, PARKED, ClusterView, ModelView

GiB = 2**30


@dataclass(frozen=True)
class DefaultConfig:
    """Thresholds of the default policy. Rates are requests per second."""

    # A model at or above this rate is hot: replicas, fast devices, its own device.
    hot_rate: float = 1.0
    # A hot model with a device to itself stays hot down to this rate, so a
    # rate hovering around hot_rate does not flip it back and forth.
    cold_rate: float = 0.5
    # Nothing queued or running and no arrival for this long: scale to zero.
    idle_unload_s: float = 600.0
    # What one active copy serves on a speed-1.0 device; sizes hot replica counts.
    replica_rps: float = 2.0
    # Per-model replica_rps (a 70B model serves fewer requests than a 1B one).
    replica_rps_by_model: Mapping[str, float] = field(default_factory=dict, hash=False)
    # Scale in only if one replica fewer would run at or below this fraction
    # of its capacity: the gap to 1.0 is the hysteresis against flapping.
    scale_in_util: float = 0.5
    # From this footprint a model counts as big and prefers fast devices even when cold.
    big_model_bytes: int = 40 * GiB
    # Run the consolidation pass on quiet rounds.
    consolidate: bool = True
    # Time-share members busy at once a device takes before a cold model goes
    # elsewhere (Aegaeon fits up to 7 models per GPU); 0: cold models never
    # join a time-shared engine by themselves.
    timeshare_max_models: int = 7
    # How long one request keeps its model busy, for counting busy members: a
    # model at rate r counts min(1, r * timeshare_busy_s).
    timeshare_busy_s: float = 30.0
    # ... and only while its members' measured TTFT and TPOT stay within this
    # fraction of their SLOs: the rest is the margin a newcomer's turns cost.
    timeshare_headroom: float = 0.8

    def __post_init__(self):
        if not 0 <= self.cold_rate <= self.hot_rate:
            raise ValueError(f"need 0 <= cold_rate <= hot_rate, "
                             f"got {self.cold_rate} and {self.hot_rate}")
        if self.hot_rate <= 0:
            raise ValueError(f"hot_rate must be positive, got {self.hot_rate}")
        if self.timeshare_max_models < 0:
            raise ValueError(f"timeshare_max_models must be >= 0, "
                             f"got {self.timeshare_max_models}")
        if self.timeshare_busy_s <= 0:
            raise ValueError(f"timeshare_busy_s must be positive, got {self.timeshare_busy_s}")
        if not 0 < self.timeshare_headroom <= 1:
            raise ValueError(f"timeshare_headroom must be in (0, 1], "
                             f"got {self.timeshare_headroom}")
        if self.idle_unload_s < 0:
            raise ValueError(f"idle_unload_s must be >= 0, got {self.idle_unload_s}")
        if not 0 < self.scale_in_util < 1:
            raise ValueError(f"scale_in_util must be in (0, 1), got {self.scale_in_util}")
        rps = {"replica_rps": self.replica_rps, **self.replica_rps_by_model}
        bad = {k: v for k, v in rps.items() if not v > 0}
        if bad:
            raise ValueError(f"replica rates must be positive: {bad}")
        # A read-only copy: the config is frozen, its map should be too.
        object.__setattr__(self, "replica_rps_by_model",
                           MappingProxyType(dict(self.replica_rps_by_model)))

    def rps(self, model: str) -> float:
        """Requests per second one copy of ``model`` serves on a speed-1.0 device."""
        return self.replica_rps_by_model.get(model, self.replica_rps)


class DefaultPolicy:
    name = "default"

    def __init__(self, config: DefaultConfig | None = None, **overrides):
        if config is not None and overrides:
            raise ValueError("pass either a DefaultConfig or keyword overrides, not both")
        self.config = config if config is not None else DefaultConfig(**overrides)

    def decide(self, view: ClusterView, now: float) -> list[Action]:
        c = self.config
        heat = Heat.of(view, now, c.hot_rate, c.cold_rate, c.idle_unload_s)
        plan = Planner(view)
        self._unload_idle(plan, heat)
        self._scale_in(plan, heat)
        self._acquire(plan, heat)
        self._scale_out(plan, heat)
        if not plan.actions and c.consolidate:
            give_hot_whole_devices(plan, heat)
            if not plan.actions:
                empty_one_device(plan, heat)
        return plan.actions

    # --- phases -------------------------------------------------------------

    def _unload_idle(self, plan: Planner, heat: Heat) -> None:
        """Idle models go to zero copies, or to ``min_replicas`` active ones
        (kept on the cheapest devices). Pinned models stay as they are."""
        for name in sorted(heat.idle):
            m = plan.view.model(name)
            if m.pinned:
                continue
            active = sorted(m.on(ACTIVE), key=lambda d: cheap_first(plan.view.device(d)))
            drop = active[m.min_replicas:] + list(m.on(PARKED))
            for d in sorted(drop):
                plan.do(Unload(name, d, reason=f"{name} idle for {self.config.idle_unload_s} s"))

    def _scale_in(self, plan: Planner, heat: Heat) -> None:
        """Drop the slowest replica while the rest would still run at or below
        ``scale_in_util`` (or while above ``max_replicas``)."""
        for m in self._live(plan.view, heat):
            rate = plan.view.demand_of(m.name).rate
            floor = max(1, m.min_replicas)
            while True:
                m = plan.view.model(m.name)
                # A time-share member is active only while it has its turn:
                # not a replica to count or drop.
                active = [d for d in m.on(ACTIVE) if not m.placement(d).timeshared]
                if len(active) <= floor:
                    break
                worst = min(active, key=lambda d: (plan.view.device(d).speed,
                                                   -plan.view.device(d).cost_per_hour, d))
                rest = [d for d in active if d != worst]
                rest_rps = capacity_rps(plan.view, rest, self.config.rps(m.name))
                room = self.config.scale_in_util * rest_rps
                over_max = len(active) > max(floor, m.max_replicas)
                if not (over_max or rate <= room):
                    break
                plan.do(ScaleIn(m.name, worst, reason=f"{m.name}: {rate:.2f} req/s fits "
                                                      f"{len(rest)} replicas"))

    def _acquire(self, plan: Planner, heat: Heat) -> None:
        """Most wanted first, so whatever it displaces gets its turn after it.

        A model a device time-shares within its TPOT SLO is served already.
        Requests waiting, a hot model or an unmet min_replicas need a copy in
        memory now, and ask for capacity if none can be had. A cold model
        with only a recent rate is content to rest parked next to an active
        engine of its family (one swap away); otherwise it takes free memory
        or displaces less-wanted models, but does not ask for hardware.
        """
        for m in self._live(plan.view, heat):
            m = plan.view.model(m.name)
            if m.on(*IN_MEMORY) or timeshare_served(m):
                continue
            d = plan.view.demand_of(m.name)
            urgent = d.queue > 0 or d.inflight > 0 or m.min_replicas > 0 or m.name in heat.hot
            if urgent or (d.rate > 0 and not swap_ready(plan.view, m)):
                acquire(plan, m, heat, self._fast(m, heat), ask=urgent,
                        engine_rps=self.config.rps(m.name),
                        max_members=self.config.timeshare_max_models,
                        headroom=self.config.timeshare_headroom,
                        busy_s=self.config.timeshare_busy_s)

    def _scale_out(self, plan: Planner, heat: Heat) -> None:
        """Up to ``min_replicas`` for everyone; beyond that, hot models add the
        best free device while capacity is below their rate (up to max_replicas)."""
        for m in self._live(plan.view, heat):
            demand = plan.view.demand_of(m.name)
            floor = max(1 if has_demand(demand) else 0, m.min_replicas)
            ceiling = max(floor, m.max_replicas)
            while True:
                m = plan.view.model(m.name)
                copies = m.on(*IN_MEMORY)
                if not copies or len(copies) >= ceiling:
                    break  # no copy: acquire already asked for capacity
                short = capacity_rps(plan.view, copies, self.config.rps(m.name)) < demand.rate
                if len(copies) >= floor and not (m.name in heat.hot and short):
                    break
                if not self._add_replica(plan, m, heat):
                    plan.do(capacity_request(m, f"wants replica {len(copies) + 1}",
                                             self._fast(m, heat)))
                    break

    # --- helpers --------------------------------------------------------------

    def _add_replica(self, plan: Planner, m: ModelView, heat: Heat) -> bool:
        view, hot = plan.view, heat.hot_devices(plan.view)
        fast = self._fast(m, heat)
        options = [d for d in view.devices if fits(view, m, d)
                   and (m.placement(d.id) is None or m.placement(d.id).state == PARKED)]
        if not options:
            return False
        d = min(options, key=lambda d: device_key(view, m, d, fast, hot))
        why = f"{m.name}: more capacity"
        plan.do(Wake(m.name, d.id, reason=why) if m.placement(d.id) else
                ScaleOut(m.name, d.id, reason=why))
        return True

    def _fast(self, m: ModelView, heat: Heat) -> bool:
        return m.name in heat.hot or m.footprint >= self.config.big_model_bytes

    @staticmethod
    def _live(view: ClusterView, heat: Heat) -> list[ModelView]:
        """Models to serve this round, most wanted first: all but the idle
        ones, and idle ones too while min_replicas asks for copies."""
        live = [m for m in view.models if m.name not in heat.idle or m.min_replicas > 0]
        return sorted(live, key=lambda m: priority_order(view, m.name))
