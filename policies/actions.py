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
    """Ask the autoscaler for a device with this much memory (and kind)."""

    memory_bytes: int
    vendors: tuple[str, ...] = ()
    accelerators: tuple[str, ...] = ()
    for_model: str = ""
