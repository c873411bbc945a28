"""The standing capacity request: how many devices of each kind the cluster
should have, and which kind each unmet want gets.

Ray's autoscaler keeps one request (``request_resources`` replaces the last
one on every call) and reads it as a total: "the cluster must be able to
fit these bundles", devices already there counted. So the request is not a
list of additions but is rebuilt every round as

    want[k] = kept[k] + new[k]

- ``kept[k]``: devices of kind ``k`` in service (and not released this round),
  plus released ones taken back (``reclaim``);
- ``new[k]``: devices the round's unmet wants (``RequestCapacity``) need,
  first-fit-decreasing by memory onto the kind chosen for each want.

A want's kind: one the model allows (vendor, accelerator type) whose device
memory holds its footprint, below the kind's ``max_devices``. A hot or big
model (``fast``) gets the fastest such kind and a device to itself; any
other the cheapest (then the fastest), sharing a new device with other cold
wants when their footprints fit together (they will be co-located there).
A released device whose node is still up is taken back before a new one is
asked for: it is there already.

Growth takes effect at once (requests wait on it). A kind's count shrinks
only after the smaller number has held for ``shrink_delay_s`` (hysteresis:
a want that flickers does not make nodes come and go). The request then
pins each device in service to its node (``compose``), and asks for the
rest of the kind's count on any node.

Pure: no Ray, no clock; kinds and devices are plain data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from policies.actions import RequestCapacity
from policies.view import DeviceView, ModelView


@dataclass(frozen=True)
class NodeKind:
    """One kind of device the autoscaler can add (an accelerator type that
    some node type of the cluster config provides)."""

    name: str  # Ray's accelerator type string, e.g. "H100"
    vendor: str  # "nvidia", "amd", "huawei", "intel"
    memory_bytes: int  # per device (the catalog's AcceleratorProfile)
    speed: float = 1.0  # relative decode throughput
    cost_per_hour: float = 0.0  # per device
    # The most devices of this kind the request ever asks for (node type's
    # max_workers times its devices per node): beyond it a want stays unmet.
    max_devices: int = 8

    def allows(self, vendors: tuple[str, ...], accelerators: tuple[str, ...],
               memory_bytes: int) -> bool:
        return ((not vendors or self.vendor in vendors)
                and (not accelerators or self.name in accelerators)
                and memory_bytes <= self.memory_bytes)


def kind_order(kinds: Iterable[NodeKind], fast: bool) -> list[NodeKind]:
    """Kinds in the order a want tries them: fastest first for a hot or big
    model, else cheapest first (then fastest). Ends in the name: deterministic."""
    if fast:
        return sorted(kinds, key=lambda k: (-k.speed, k.cost_per_hour, k.name))
    return sorted(kinds, key=lambda k: (k.cost_per_hour, -k.speed, k.name))


@dataclass
class _Bin:
    """A device the request will have: a new one, or a spare taken back."""

    kind: str
    free_bytes: int
    exclusive: bool  # opened by a fast want: nobody shares it
    device: str | None = None  # the spare device's id when taken back


@dataclass(frozen=True)
class Packing:
    """Where this round's wants go. ``new`` counts new devices by kind;
    ``reclaim`` lists spare devices taken back; ``unmet`` says, per model,
    why no kind can take it (the standing request cannot help it)."""

    new: Mapping[str, int] = field(default_factory=dict)
    reclaim: tuple[str, ...] = ()
    unmet: Mapping[str, str] = field(default_factory=dict)


def pack(wants: Iterable[RequestCapacity], kinds: Iterable[NodeKind],
         spare: Iterable[DeviceView], kept: Mapping[str, int]) -> Packing:
    """First-fit-decreasing of the wants onto spare devices, then new ones.

    Invariant: ``kept[k] + new[k] <= max_devices`` for every kind ``k``."""
    kinds = {k.name: k for k in kinds}
    spares = sorted(spare, key=lambda d: d.id)
    bins: list[_Bin] = []
    new: Counter[str] = Counter()
    unmet: dict[str, str] = {}
    for w in sorted(wants, key=lambda w: (not w.fast, -w.memory_bytes, w.for_model)):
        order = [k for k in kind_order(kinds.values(), w.fast)
                 if k.allows(w.vendors, w.accelerators, w.memory_bytes)]
        rank = {k.name: i for i, k in enumerate(order)}
        b = None if w.fast else _open_bin(bins, rank, w.memory_bytes)
        b = b or _take_spare(spares, rank, w) or _new_bin(order, kept, new, w)
        if b is None:
            unmet[w.for_model] = _why_unmet(w, order)
            continue
        if b not in bins:
            bins.append(b)
        b.free_bytes -= w.memory_bytes
        b.exclusive = b.exclusive or w.fast
    reclaim = tuple(sorted(b.device for b in bins if b.device is not None))
    return Packing(dict(sorted(new.items())), reclaim, dict(sorted(unmet.items())))


def _open_bin(bins: list[_Bin], rank: Mapping[str, int], nbytes: int) -> _Bin | None:
    fits = [b for b in bins if b.kind in rank and not b.exclusive and b.free_bytes >= nbytes]
    return min(fits, key=lambda b: (rank[b.kind], b.free_bytes), default=None)


def _take_spare(spares: list[DeviceView], rank: Mapping[str, int],
                w: RequestCapacity) -> _Bin | None:
    # ``rank`` holds only kinds the want allows, so the kind check covers vendors too.
    fits = [d for d in spares if d.accelerator_type in rank and d.memory_bytes >= w.memory_bytes]
    if not fits:
        return None
    d = min(fits, key=lambda d: (rank[d.accelerator_type], d.id))
    spares.remove(d)
    return _Bin(d.accelerator_type, d.memory_bytes, w.fast, d.id)


def _new_bin(order: list[NodeKind], kept: Mapping[str, int], new: Counter,
             w: RequestCapacity) -> _Bin | None:
    for k in order:
        if kept.get(k.name, 0) + new[k.name] < k.max_devices:
            new[k.name] += 1
            return _Bin(k.name, k.memory_bytes, w.fast)
    return None


def _why_unmet(w: RequestCapacity, allowed: list[NodeKind]) -> str:
    if allowed:
        return (f"every addable kind it allows is at its max_devices "
                f"({', '.join(f'{k.name}={k.max_devices}' for k in allowed)})")
    return (f"no addable kind allows it (vendors {list(w.vendors) or 'any'}, accelerators "
            f"{list(w.accelerators) or 'any'}, {w.memory_bytes} bytes)")


def settle(target: Mapping[str, int], standing: Mapping[str, int],
           lower_since: Mapping[str, float], now: float,
           shrink_delay_s: float) -> tuple[dict[str, int], dict[str, float]]:
    """Hysteresis on the request: per kind, growth at once, a shrink once the
    smaller number has held ``shrink_delay_s``. Returns (counts, lower_since)."""
    counts: dict[str, int] = {}
    since: dict[str, float] = {}
    for kind in sorted(set(target) | set(standing)):
        want, have = target.get(kind, 0), standing.get(kind, 0)
        if want < have:
            first = lower_since.get(kind, now)
            if now - first < shrink_delay_s:
                want = have
                since[kind] = first
        if want > 0:
            counts[kind] = want
    return counts, since


def compose(totals: Mapping[str, int],
            pinned: Mapping[tuple[str, str], int]) -> tuple[tuple[str, str | None, int], ...]:
    """The request from per-kind totals: the devices in service pinned to
    their nodes (``pinned``: (kind, node) -> devices), the rest of each
    kind's total on any node. Pinning is what lets the autoscaler remove
    exactly the node whose devices were released: a count alone would be
    satisfied by any node of the kind, the idle one included."""
    out: list[tuple[str, str | None, int]] = []
    for kind in sorted(totals):
        on_nodes = sorted((node, n) for (k, node), n in pinned.items() if k == kind and n > 0)
        out += [(kind, node, n) for node, n in on_nodes]
        rest = totals[kind] - sum(n for _, n in on_nodes)
        if rest > 0:
            out.append((kind, None, rest))
    return tuple(sorted(out, key=lambda e: (e[0], e[1] or "")))


def why_unplaceable(m: ModelView, devices: Iterable[DeviceView],
                    kinds: Iterable[NodeKind]) -> str | None:
    """None if some device here, or some kind that can be added, allows
    ``m`` and holds its footprint; else why not, naming the constraint."""
    devices, kinds = list(devices), list(kinds)
    if any(m.allowed_on(d) and d.memory_bytes >= m.footprint for d in devices):
        return None
    if any(k.allows(m.allowed_vendors, m.allowed_accelerators, m.footprint) for k in kinds):
        return None
    present = Counter(f"{d.vendor}/{d.accelerator_type or 'cpu'}" for d in devices)
    return (f"model {m.name!r} allows vendors {list(m.allowed_vendors) or 'any'} and "
            f"accelerators {list(m.allowed_accelerators) or 'any'} and needs "
            f"{m.footprint} bytes of device memory: no device in the cluster fits "
            f"(present: {dict(sorted(present.items())) or 'none'}) and the autoscaler can add "
            f"none that does (addable: {sorted(k.name for k in kinds) or 'none'})")
