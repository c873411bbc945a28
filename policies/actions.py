"""What a policy asks for. The controller executes these against engine
workers; the simulator applies them to its cluster model.

Every action is a frozen dataclass, so decisions compare and hash, and a
property test can replay them. ``reason`` is for logs and is left out of
equality so two policies that agree on what to do compare equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field


# Reason prefix of a Park/Unload that makes room for another model; the
# controller counts those as evictions (reason stays out of equality).
EVICTION_REASON = "make room for"


@dataclass(frozen=True)
class Action:
    reason: str = field(default="", compare=False, kw_only=True)


@dataclass(frozen=True)
class Load(Action):
    """Put ``model`` on ``device``: a new engine (active) or host cache only (park)."""

    model: str
    device: str
    park: bool = False


@dataclass(frozen=True)
class Swap(Action):
    """Parked ``model`` takes over the engine of same-family ``replace`` on ``device``."""

    model: str
    device: str
    replace: str


@dataclass(frozen=True)
class Park(Action):
    """Active -> parked: frees the device memory, keeps the weights in host memory."""

    model: str
    device: str


@dataclass(frozen=True)
class Wake(Action):
    """Parked -> active in an engine of its own (GPU wake_up, or a new engine)."""

    model: str
    device: str


@dataclass(frozen=True)
class Unload(Action):
    """Remove ``model``'s copy from ``device`` entirely (scale to zero there)."""

    model: str
    device: str


@dataclass(frozen=True)
class Migrate(Action):
    """Make-before-break move of one copy, its in-flight requests included."""

    model: str
    source: str
    target: str


@dataclass(frozen=True)
class ScaleOut(Action):
    """One more active replica of a hot model, on ``device``."""

    model: str
    device: str


@dataclass(frozen=True)
class ScaleIn(Action):
    """One replica fewer: drain the copy on ``device`` and unload it."""

    model: str
    device: str


@dataclass(frozen=True)
class RequestCapacity(Action):
    """One more device is wanted: one with this much memory, of an allowed
    kind. Placement policies emit it; the elastic layer
    (``policies/elastic.py``) folds every round's wants into the one
    standing request (``SetCapacity``) and never executes it as such."""

    memory_bytes: int
    vendors: tuple[str, ...] = ()
    accelerators: tuple[str, ...] = ()
    for_model: str = ""
    # A hot or big model: the fastest kind is chosen for it, not the cheapest.
    fast: bool = False


@dataclass(frozen=True)
class SetCapacity(Action):
    """Replace the standing capacity request: the devices the cluster should
    have, as ``(kind, node, count)``, sorted. A device in service is pinned
    to its node, so the autoscaler keeps that node and no other; ``node``
    None counts devices of the kind on any node (new ones). The counts are
    totals, devices already there included, as Ray's ``request_resources``
    reads them; an empty tuple withdraws the request."""

    devices: tuple[tuple[str, str | None, int], ...]


@dataclass(frozen=True)
class ReleaseDevice(Action):
    """Give an empty device back: its engine worker stops, so its node can
    go idle and the autoscaler may remove it. Only a device with no copy
    left on it (parked ones are unloaded first, in the same round)."""

    device: str


@dataclass(frozen=True)
class ReclaimDevice(Action):
    """Take a released device whose node is still up back into service (a
    new engine worker): cheaper and faster than asking for a new node."""

    device: str
