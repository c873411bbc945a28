"""The one implementation of action semantics: ``apply(view, action)``.

The controller carries actions out against engine workers; the simulator,
the tests and the policies themselves (to plan several actions inside one
``decide`` without double-booking memory) use ``apply`` to predict the view
that results. Keeping the rules here, once, is what lets the live cluster
and the simulator agree.

Invariants every view that ``apply`` returns keeps (given a view that kept
them): at most one placement per (model, device); on every device the
active and loading footprints sum to at most its memory; every placement sits
on a device its model allows. ``apply`` checks before it builds, so an
invalid action raises ``InvalidAction`` and changes nothing.

Rules stricter than "what is physically possible", each on purpose:

- Park and Unload refuse a copy with in-flight requests (they would be cut
  off); ScaleIn drains and Migrate carries them, so those two may.
- Park, Unload, Migrate and swapping out a model refuse a pinned model; a
  ScaleIn of a pinned model is fine because ScaleIn never removes the last
  active copy of any model (scale-to-zero is spelled Unload or Park).
- Migrate onto a device where the model is parked wakes that copy (as the
  actuator does) instead of counting as a duplicate.
- A model is parked only on a device it could one day be active on (it is
  allowed there and its footprint is at most the device's memory).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields, replace

from policies.actions import (Action, Load, Migrate, Park, ReclaimDevice, ReleaseDevice,
                              RequestCapacity, ScaleIn, ScaleOut, SetCapacity, Swap, Unload, Wake)
from policies.view import ACTIVE, LOADING, PARKED, ClusterView, DeviceView, ModelView, Placement

_IN_MEMORY = (LOADING, ACTIVE)


class InvalidAction(ValueError):
    """An action that breaks a placement rule; the message names the rule."""


def describe(action: Action) -> str:
    """``Load(model='a', device='d0', park=False)`` without the reason."""
    args = ", ".join(f"{f.name}={getattr(action, f.name)!r}"
                     for f in fields(action) if f.name != "reason")
    return f"{type(action).__name__}({args})"


def apply(view: ClusterView, action: Action) -> ClusterView:
    """The view after ``action``; raises ``InvalidAction`` if it breaks a rule."""
    handler = _HANDLERS.get(type(action))
    if handler is None:
        raise InvalidAction(f"unknown action type {type(action).__name__}")
    return handler(view, action)


def apply_all(view: ClusterView, actions: Iterable[Action]) -> ClusterView:
    """Apply in order; the first invalid action raises (nothing is half-applied
    because views are immutable: the caller still holds the original)."""
    for a in actions:
        view = apply(view, a)
    return view


def is_valid(view: ClusterView, action: Action) -> bool:
    """Check without acting: would ``apply`` accept ``action``?"""
    try:
        apply(view, action)
    except InvalidAction:
        return False
    return True


# --- lookups that fail with InvalidAction, not KeyError ---------------------

def _fail(action: Action, why: str) -> InvalidAction:
    return InvalidAction(f"{describe(action)}: {why}")


def _model(view: ClusterView, name: str, action: Action) -> ModelView:
    try:
        return view.model(name)
    except KeyError:
        raise _fail(action, f"unknown model {name!r}") from None


def _device(view: ClusterView, device_id: str, action: Action) -> DeviceView:
    try:
        return view.device(device_id)
    except KeyError:
        raise _fail(action, f"unknown device {device_id!r}") from None


def _copy(m: ModelView, device_id: str, action: Action, *states: str) -> Placement:
    p = m.placement(device_id)
    if p is None:
        raise _fail(action, f"{m.name!r} has no copy on {device_id!r}")
    if states and p.state not in states:
        raise _fail(action, f"{m.name!r} is {p.state} on {device_id!r}, "
                            f"needs {' or '.join(states)}")
    return p


def _allowed(m: ModelView, d: DeviceView, action: Action) -> None:
    if not m.allowed_on(d):
        raise _fail(action, f"{m.name!r} is not allowed on {d.id!r} "
                            f"({d.vendor}/{d.accelerator_type}; allows vendors "
                            f"{m.allowed_vendors or 'any'}, accelerators "
                            f"{m.allowed_accelerators or 'any'})")


def _room(view: ClusterView, m: ModelView, d: DeviceView, action: Action,
          freed: int = 0) -> None:
    free = view.free_bytes(d.id) + freed
    if free < m.footprint:
        raise _fail(action, f"over-commit: {d.id!r} has {free} free bytes, "
                            f"{m.name!r} needs {m.footprint}")


def _not_on(m: ModelView, d: DeviceView, action: Action) -> None:
    p = m.placement(d.id)
    if p is not None:
        raise _fail(action, f"duplicate placement: {m.name!r} is already {p.state} on {d.id!r}")


def _not_pinned(m: ModelView, action: Action) -> None:
    if m.pinned:
        raise _fail(action, f"{m.name!r} is pinned")


def _idle(m: ModelView, p: Placement, action: Action) -> None:
    if p.inflight:
        raise _fail(action, f"{m.name!r} has {p.inflight} in-flight requests on {p.device!r}")


# --- building the next view ---------------------------------------------------

def _set(view: ClusterView, m: ModelView, device_id: str, new: Placement | None) -> ClusterView:
    """``m``'s placement on ``device_id`` replaced by ``new`` (None = removed)."""
    kept = tuple(p for p in m.placements if p.device != device_id)
    placements = kept + ((new,) if new is not None else ())
    # Sorted by device so two routes to the same state give equal views.
    placements = tuple(sorted(placements, key=lambda p: p.device))
    models = tuple(replace(x, placements=placements) if x.name == m.name else x
                   for x in view.models)
    return replace(view, models=models)


def _load(view: ClusterView, a: Load) -> ClusterView:
    m, d = _model(view, a.model, a), _device(view, a.device, a)
    _allowed(m, d, a)
    _not_on(m, d, a)
    if not a.park:
        _room(view, m, d, a)
    elif m.footprint > d.memory_bytes:
        raise _fail(a, f"{m.name!r} needs {m.footprint} bytes, more than all of {d.id!r} "
                       f"({d.memory_bytes}): parked there it could never become active")
    return _set(view, m, d.id, Placement(d.id, PARKED if a.park else ACTIVE))


def _swap(view: ClusterView, a: Swap) -> ClusterView:
    m, d = _model(view, a.model, a), _device(view, a.device, a)
    r = _model(view, a.replace, a)
    if m.name == r.name:
        raise _fail(a, "a model cannot replace itself")
    if m.family != r.family:
        raise _fail(a, f"families differ ({m.family!r} vs {r.family!r}): no in-place swap")
    _allowed(m, d, a)
    _copy(m, d.id, a, PARKED)
    rp = _copy(r, d.id, a, ACTIVE)
    _not_pinned(r, a)
    _idle(r, rp, a)
    # Same family means same weight shapes; the KV reservation may still differ.
    _room(view, m, d, a, freed=r.footprint)
    view = _set(view, r, d.id, Placement(d.id, PARKED))
    return _set(view, view.model(m.name), d.id, Placement(d.id, ACTIVE))


def _park(view: ClusterView, a: Park) -> ClusterView:
    m, d = _model(view, a.model, a), _device(view, a.device, a)
    p = _copy(m, d.id, a, ACTIVE)
    _not_pinned(m, a)
    _idle(m, p, a)
    return _set(view, m, d.id, Placement(d.id, PARKED))


def _wake(view: ClusterView, a: Wake) -> ClusterView:
    m, d = _model(view, a.model, a), _device(view, a.device, a)
    _copy(m, d.id, a, PARKED)
    _allowed(m, d, a)
    _room(view, m, d, a)
    return _set(view, m, d.id, Placement(d.id, ACTIVE))


def _unload(view: ClusterView, a: Unload) -> ClusterView:
    m, d = _model(view, a.model, a), _device(view, a.device, a)
    p = _copy(m, d.id, a)
    _not_pinned(m, a)
    _idle(m, p, a)
    return _set(view, m, d.id, None)


def _scale_out(view: ClusterView, a: ScaleOut) -> ClusterView:
    m, d = _model(view, a.model, a), _device(view, a.device, a)
    _allowed(m, d, a)
    _not_on(m, d, a)
    _room(view, m, d, a)
    return _set(view, m, d.id, Placement(d.id, ACTIVE))


def _scale_in(view: ClusterView, a: ScaleIn) -> ClusterView:
    m, d = _model(view, a.model, a), _device(view, a.device, a)
    _copy(m, d.id, a, ACTIVE)
    if len(m.on(ACTIVE)) < 2:
        raise _fail(a, f"last active copy of {m.name!r}: scale to zero with Unload or Park")
    return _set(view, m, d.id, None)


def _migrate(view: ClusterView, a: Migrate) -> ClusterView:
    m = _model(view, a.model, a)
    s, t = _device(view, a.source, a), _device(view, a.target, a)
    if s.id == t.id:
        raise _fail(a, "source and target are the same device")
    p = _copy(m, s.id, a, ACTIVE)
    _not_pinned(m, a)
    _allowed(m, t, a)
    there = m.placement(t.id)
    if there is not None and there.state != PARKED:
        raise _fail(a, f"duplicate placement: {m.name!r} is already {there.state} on {t.id!r}")
    _room(view, m, t, a)
    view = _set(view, m, s.id, None)
    return _set(view, view.model(m.name), t.id, Placement(t.id, ACTIVE, p.inflight))


def _request_capacity(view: ClusterView, a: RequestCapacity) -> ClusterView:
    if a.memory_bytes <= 0:
        raise _fail(a, "memory_bytes must be positive")
    return view  # a hint to the autoscaler; the view changes when a device joins


def _set_capacity(view: ClusterView, a: SetCapacity) -> ClusterView:
    keys = [(k, node or "") for k, node, _ in a.devices]
    if keys != sorted(set(keys)):
        raise _fail(a, "(kind, node) entries must be sorted and unique")
    if any(n <= 0 for _, _, n in a.devices):
        raise _fail(a, "counts must be positive (leave a kind out to ask for none)")
    return view  # the request only; devices join the view when their nodes do


def _release_device(view: ClusterView, a: ReleaseDevice) -> ClusterView:
    d = _device(view, a.device, a)
    held = view.residents(d.id)
    if held:
        raise _fail(a, f"{d.id!r} still holds {sorted(m.name for m in held)}")
    return replace(view, devices=tuple(x for x in view.devices if x.id != d.id))


def _reclaim_device(view: ClusterView, a: ReclaimDevice) -> ClusterView:
    if any(d.id == a.device for d in view.devices):
        raise _fail(a, f"{a.device!r} is in service already")
    return view  # it joins the view once its new worker reports


_HANDLERS = {
    Load: _load, Swap: _swap, Park: _park, Wake: _wake, Unload: _unload,
    ScaleOut: _scale_out, ScaleIn: _scale_in, Migrate: _migrate,
    RequestCapacity: _request_capacity, SetCapacity: _set_capacity,
    ReleaseDevice: _release_device, ReclaimDevice: _reclaim_device,
}


class Planner:
    """The actions decided so far inside one ``decide`` call and the view they
    lead to. Every step goes through ``apply``, so a policy that plans with it
    can never double-book memory or break a rule within a round. Local to one
    call: policies keep no planner between calls."""

    def __init__(self, view: ClusterView):
        self.view = view
        self.actions: list[Action] = []

    def do(self, *actions: Action) -> None:
        """Apply and record; raises ``InvalidAction`` (a policy bug) if one breaks a rule."""
        for a in actions:
            self.view = apply(self.view, a)
            self.actions.append(a)
