"""Elastic capacity around a placement policy: one standing request to Ray's
autoscaler, empty devices given back, released ones taken back.

``ElasticPolicy.decide(view, state, now) -> (actions, next_state)`` runs the
placement policy on the devices in service, then:

1. veto: a copy on an addable-kind device younger than
   ``min_node_lifetime_s`` is not moved off it (ScaleIn, Migrate from it): a
   node just paid for keeps its replica through a lull, so a burst that
   comes back finds it warm. The round's other actions are re-checked with
   ``plan.apply`` and any that relied on a vetoed one is dropped;
2. release: an addable-kind device that has held no copy in memory and no
   request for ``release_idle_s`` and has lived ``min_node_lifetime_s`` is
   given back (``ReleaseDevice``, its parked copies unloaded first): its
   worker stops, its node goes idle, and the autoscaler removes it once the
   standing request stops counting it;
3. request: the round's ``RequestCapacity`` wants are packed onto released
   devices still up (``ReclaimDevice``) and new devices
   (``policies/capacity.py``); the standing request is kept + new, with
   shrink hysteresis, and a ``SetCapacity`` goes out when it changes (and
   on the first round, which also clears a predecessor's request).

Invariants: the standing request never counts fewer devices of a kind than
are in service (target = kept + new, and a shrink only goes down to the
target), so the autoscaler never removes a node Shoal uses. A device leaves
service only by ``ReleaseDevice``, which needs it empty and idle, so no
request is lost to a scale-down: requests on a copy that moves (ScaleIn,
Migrate) go with it through the request path's resume.

Pure like every policy here: the state is returned, never kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from policies.actions import (Action, Migrate, ReclaimDevice, ReleaseDevice, RequestCapacity,
                              ScaleIn, SetCapacity, Unload)
from policies.base import Policy
from policies.capacity import NodeKind, compose, pack, settle
from policies.choose import is_empty
from policies.plan import InvalidAction, Planner, apply_all, is_valid
from policies.view import ClusterView, DeviceView


@dataclass(frozen=True)
class ElasticConfig:
    """Timers of the elastic layer, in seconds."""

    # A kind's request shrinks only after the smaller count held this long.
    shrink_delay_s: float = 30.0
    # A device must sit empty (nothing in memory, no request) this long ...
    release_idle_s: float = 60.0
    # ... and have been in service this long before it is given back; a copy
    # on a younger device is not moved off it either.
    min_node_lifetime_s: float = 300.0
    # Give empty devices back at all (off when no autoscaler can use them).
    release: bool = True

    def __post_init__(self):
        bad = {k: v for k, v in (("shrink_delay_s", self.shrink_delay_s),
                                 ("release_idle_s", self.release_idle_s),
                                 ("min_node_lifetime_s", self.min_node_lifetime_s)) if v < 0}
        if bad:
            raise ValueError(f"must be >= 0: {bad}")


def _frozen(m: Mapping) -> Mapping:
    return MappingProxyType(dict(m))


@dataclass(frozen=True)
class ElasticState:
    """What the elastic layer remembers between rounds (the controller or
    the simulator stores it and hands it back)."""

    # Devices per kind the request counts (hysteresis works on these).
    standing: tuple[tuple[str, int], ...] = ()
    lower_since: Mapping[str, float] = field(default_factory=dict)  # kind -> shrink wanted since
    # The request last sent (SetCapacity.devices); None = not sent (never,
    # or it failed), so the next round sends one whatever it is.
    request: tuple[tuple[str, str | None, int], ...] | None = None
    first_seen: Mapping[str, float] = field(default_factory=dict)  # device -> in service since
    empty_since: Mapping[str, float] = field(default_factory=dict)  # device -> empty since
    released: frozenset[str] = frozenset()  # given back; no worker while their node is up
    # The round's account, for status only (never read back by the policy).
    wants: tuple[RequestCapacity, ...] = ()
    unmet: Mapping[str, str] = field(default_factory=dict)  # model -> why no kind helps

    def __post_init__(self):
        for name in ("lower_since", "first_seen", "empty_since", "unmet"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))


@dataclass(frozen=True)
class ElasticView:
    cluster: ClusterView  # the devices in service (each has an engine worker)
    spare: tuple[DeviceView, ...] = ()  # released devices whose nodes are still up


class ElasticPolicy:
    def __init__(self, placement: Policy, kinds: tuple[NodeKind, ...] = (),
                 config: ElasticConfig | None = None):
        self.placement = placement
        self.kinds = tuple(kinds)
        self.config = config or ElasticConfig()
        self.name = placement.name

    def decide(self, view: ElasticView, state: ElasticState,
               now: float) -> tuple[list[Action], ElasticState]:
        c, cfg = view.cluster, self.config
        addable = {k.name for k in self.kinds}
        first_seen = {d.id: state.first_seen.get(d.id, now) for d in c.devices + view.spare}
        young = {d.id for d in c.devices if d.accelerator_type in addable
                 and now - first_seen[d.id] < cfg.min_node_lifetime_s}
        inner = self.placement.decide(c, now)
        wants = tuple(a for a in inner if isinstance(a, RequestCapacity))
        plan = Planner(c)
        for a in inner:
            if not isinstance(a, RequestCapacity) and _source(a) not in young \
                    and is_valid(plan.view, a):
                plan.do(a)
        empty_since = self._release(plan, state, now, first_seen, addable)
        released = ({d.id for d in view.spare} & state.released) | {
            a.device for a in plan.actions if isinstance(a, ReleaseDevice)}
        serving = [d for d in plan.view.devices if d.accelerator_type in addable]
        kept = Counter(d.accelerator_type for d in serving)
        spare = [d for d in view.spare if d.id in released]
        packing = pack(wants, self.kinds, spare, kept + Counter(d.accelerator_type for d in spare))
        by_id = {d.id: d for d in spare}
        for dev in packing.reclaim:
            plan.do(ReclaimDevice(dev, reason=f"wanted again: {by_id[dev].accelerator_type} "
                                              f"node still up"))
            serving.append(by_id[dev])
        target = Counter(d.accelerator_type for d in serving) + Counter(packing.new)
        counts, lower_since = settle(target, dict(state.standing), state.lower_since, now,
                                     cfg.shrink_delay_s)
        request = compose(counts, Counter((d.accelerator_type, d.node) for d in serving if d.node))
        if request != state.request:
            plan.do(SetCapacity(request, reason=_why(kept, packing.new, wants)))
        return plan.actions, ElasticState(
            standing=tuple(sorted(counts.items())), lower_since=lower_since, request=request,
            first_seen=first_seen,
            empty_since=empty_since, released=frozenset(released - set(packing.reclaim)),
            wants=wants, unmet=packing.unmet)

    def _release(self, plan: Planner, state: ElasticState, now: float,
                 first_seen: Mapping[str, float], addable: set[str]) -> dict[str, float]:
        """Give back the addable-kind devices empty and idle long enough, with
        their parked copies; returns ``empty_since`` for the next round."""
        cfg, empty_since = self.config, {}
        for d in sorted(plan.view.devices, key=lambda d: d.id):
            held = plan.view.residents(d.id)
            busy = any(p.inflight for m in held for p in m.placements if p.device == d.id)
            if d.accelerator_type not in addable or not is_empty(plan.view, d.id) or busy:
                continue
            since = empty_since[d.id] = state.empty_since.get(d.id, now)
            if not cfg.release or now - since < cfg.release_idle_s \
                    or now - first_seen[d.id] < cfg.min_node_lifetime_s:
                continue
            why = f"{d.id} empty for {now - since:.0f} s"
            steps = [Unload(m.name, d.id, reason=f"release {d.id}") for m in held] \
                + [ReleaseDevice(d.id, reason=why)]
            try:
                apply_all(plan.view, steps)  # e.g. a pinned parked copy keeps its device
            except InvalidAction:
                continue
            plan.do(*steps)
            empty_since.pop(d.id)
        return empty_since


def _source(a: Action) -> str | None:
    """The device an action takes a copy off (None: it takes none off)."""
    if isinstance(a, ScaleIn):
        return a.device
    if isinstance(a, Migrate):
        return a.source
    return None


def _why(kept: Counter, new: Mapping[str, int], wants: tuple[RequestCapacity, ...]) -> str:
    parts = [f"{k}: {kept[k]} in service" + (f" + {new[k]} new" if new.get(k) else "")
             for k in sorted(set(kept) | set(new))]
    for_models = sorted({w.for_model for w in wants})
    return "; ".join(parts or ["nothing wanted"]) + \
        (f" (for {', '.join(for_models)})" if for_models else "")
