"""Carrying out policy actions with the engine worker's semantics.

The rules are the live worker's (``cluster/engine/worker.py`` and
``residency.py``), not ``policies/plan.py``'s idea of them, because that is
what the cluster really does:

- On a time-sharing device a ``Load`` of a model whose family has a ready
  engine there joins that engine's turns (no memory, no start-up); the
  controller's ``Swap``, ``Wake`` and ``Park`` leave such a member to its
  engine's turns (no-ops). Otherwise ``Load`` starts an engine (the system's
  way of getting weights in: fresh start or a fast loader), or with
  ``park`` only stages the weights in the node's host cache.
- A new engine reserves its model's footprint (weights + KV) or is refused
  (``Refused``: over-commit); a model is refused on a device its vendor
  constraint forbids. The live worker refuses both the same way.
- ``Unload``, ``ScaleIn`` and the source side of ``Migrate`` take the copy
  away; its requests resume on another copy. ``Migrate`` is make before
  break: the source goes only once the target is ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from policies.actions import (Action, Load, Migrate, Park, RequestCapacity, ScaleIn, ScaleOut,
                              Swap, Unload, Wake)

from cluster.sim.costmodel import Switch
from cluster.sim.device import SimDevice
from cluster.sim.engine import SINGLE, SimEngine
from cluster.sim.systems import muxserve_placement

if TYPE_CHECKING:
    from cluster.sim.cluster import SimCluster

__all__ = ["SINGLE", "Refused", "carry_out", "join", "place_statically"]


class Refused(Exception):
    """The simulated worker would not do it (as the live one would not)."""


def carry_out(sim: "SimCluster", a: Action, now: float) -> None:
    if isinstance(a, RequestCapacity):
        sim.capacity_requests += 1
        return
    if isinstance(a, Migrate):
        _migrate(sim, a.model, sim.devices[a.source], sim.devices[a.target], now)
        return
    dev = sim.devices[a.device]
    if isinstance(a, (Load, ScaleOut)):
        _load(sim, a.model, dev, getattr(a, "park", False), sim.system.load, now)
    elif isinstance(a, Wake):
        _wake(sim, a.model, dev, now)
    elif isinstance(a, Swap):
        _swap(sim, a.model, a.replace, dev, now)
    elif isinstance(a, Park):
        _park(sim, a.model, dev, now)
    elif isinstance(a, (Unload, ScaleIn)):
        _remove(sim, a.model, dev, now, require_idle=isinstance(a, Unload))
    else:
        raise Refused(f"unknown action {a!r}")


def place_statically(sim: "SimCluster") -> None:
    """MuxServe: every engine placed at time 0, ready, never moved."""
    devices = [(d, dev.profile) for d, dev in sim.devices.items()]
    footprint = {m: sim.footprint(m) for m in sim.served}
    for model, d in muxserve_placement(list(sim.served.values()), devices, footprint):
        e = sim.make_engine(sim.devices[d], model, ready_at=0.0)
        join(sim, e, model)
        e.resident = model


# --- one action each ------------------------------------------------------------

def _load(sim, model: str, dev: SimDevice, park: bool, how: Switch, now: float) -> None:
    _allowed(sim, model, dev)
    group = _group(sim, dev, model)
    if group is not None:
        if model not in group.members:
            dev.parked.discard(model)
            join(sim, group, model)
        return
    if park:
        dev.parked.add(model)
        return
    if _engine_of(sim, dev, model) is not None:
        return  # already active there (a repeated load is a no-op, as live)
    _start(sim, model, dev, how, now)


def _wake(sim, model: str, dev: SimDevice, now: float) -> None:
    if _group_member(sim, dev, model) or _engine_of(sim, dev, model) is not None:
        return  # a time-share member, or already awake
    if model not in dev.parked:
        raise Refused(f"{model} is not parked on {dev.id}")
    _allowed(sim, model, dev)
    dev.parked.discard(model)
    _start(sim, model, dev, Switch.WAKE, now)


def _swap(sim, model: str, replace: str, dev: SimDevice, now: float) -> None:
    if _group_member(sim, dev, model):
        return  # its turns are its engine's
    e = _engine_of(sim, dev, replace)
    if e is None or not e.ready:
        raise Refused(f"no ready engine of {replace} on {dev.id}")
    if e.timeshared:  # a parked outsider swapped into a shared engine: it joins the turns
        dev.parked.discard(model)
        join(sim, e, model)
        return
    if e.inflight(replace):
        raise Refused(f"{replace} has requests on {dev.id}")
    if sim.footprint(model) > sim.footprint(replace) + dev.free_bytes:
        raise Refused(f"over-commit: {model} needs {sim.footprint(model)} bytes on {dev.id}")
    _drop_member(sim, e, replace, now)
    dev.parked.add(replace)
    dev.parked.discard(model)
    e.reserve_bytes = sim.footprint(model)
    join(sim, e, model)  # its first turn swaps the weights in place


def _park(sim, model: str, dev: SimDevice, now: float) -> None:
    e = _engine_of(sim, dev, model)
    if e is None or e.timeshared:
        return  # parked already, or a time-share member: its engine's turns
    if e.inflight(model):
        raise Refused(f"{model} has requests on {dev.id}")
    _close(sim, e, now)
    dev.parked.add(model)


def _remove(sim, model: str, dev: SimDevice, now: float, require_idle: bool) -> None:
    dev.parked.discard(model)
    for e in [e for e in dev.engines if model in e.members]:
        if require_idle and e.inflight(model):
            raise Refused(f"{model} has requests on {dev.id}")
        if len(e.members) == 1:
            _close(sim, e, now)
        else:
            _drop_member(sim, e, model, now)


def _migrate(sim, model: str, src: SimDevice, dst: SimDevice, now: float) -> None:
    how = Switch.WAKE if model in dst.parked else sim.system.load
    _load(sim, model, dst, False, how, now)
    target = _engine_of(sim, dst, model)
    sim.q.at(max(now, target.ready_at), _break, sim, model, src, target)


def _break(sim, model: str, src: SimDevice, target: SimEngine) -> None:
    """The target is ready (or gone): the source copy goes, its requests move."""
    if not target.closed:
        _remove(sim, model, src, sim.q.now, require_idle=False)


# --- helpers --------------------------------------------------------------------

def _allowed(sim, model: str, dev: SimDevice) -> None:
    if not sim.served[model].allowed_on(dev.profile):
        raise Refused(f"{model} is not allowed on {dev.id} ({dev.profile.vendor})")


def _group(sim, dev: SimDevice, model: str) -> SimEngine | None:
    """A ready time-shared engine of ``model``'s family on ``dev``."""
    family = sim.profile(model).family
    return next((e for e in dev.engines if e.timeshared and e.ready and e.family == family), None)


def _group_member(sim, dev: SimDevice, model: str) -> bool:
    return any(e.timeshared and model in e.members for e in dev.engines)


def _engine_of(sim, dev: SimDevice, model: str) -> SimEngine | None:
    return next((e for e in dev.engines if model in e.members), None)


def _start(sim, model: str, dev: SimDevice, how: Switch, now: float) -> None:
    need = sim.footprint(model)
    if need > dev.free_bytes:
        raise Refused(f"over-commit: {dev.id} has {dev.free_bytes} free bytes, "
                      f"{model} needs {need}")
    took = dev.cost.switch_s(sim.profile(model), how)
    e = sim.make_engine(dev, model, ready_at=now + took)
    join(sim, e, model, flush=False)
    e.resident = model
    sim.q.at(e.ready_at, _ready, sim, e)


def _ready(sim, e: SimEngine) -> None:
    if e.closed:
        return
    e.load_done(sim.q.now)
    for m in list(e.members):
        sim.flush(m)


def join(sim, e: SimEngine, model: str, flush: bool = True) -> None:
    """``model`` becomes a member of engine ``e`` (its requests go there)."""
    e.members[model] = sim.profile(model)
    sim.copies[model].append(e)
    if flush and e.ready:
        sim.flush(model)


def _drop_member(sim, e: SimEngine, model: str, now: float) -> None:
    sim.copies[model].remove(e)
    for req in e.remove(model, now):
        sim.route(req)


def _close(sim, e: SimEngine, now: float) -> None:
    for m in e.members:
        sim.copies[m].remove(e)
    e.device.engines.remove(e)
    sim.closed_engines.append(e)
    for req in e.close(now):
        sim.route(req)
