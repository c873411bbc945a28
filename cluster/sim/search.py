"""Searches over many runs: devices needed, sustainable rate, cheapest pool.

The device search assumes attainment grows with devices (monotone) and
bisects; a run at a given point is made once.
The answers are what the runs say, nothing is extrapolated: a search whose
range never reaches the target answers None.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

ATTAIN_99 = 0.99


def min_devices(attainment: Callable[[int], float | None], lo: int, hi: int,
                target: float = ATTAIN_99) -> int | None:
    """The fewest devices n in [lo, hi] with ``attainment(n) >= target``
    (bisection), or None if even ``hi`` falls short."""
    seen: dict[int, bool] = {}

    def ok(n: int) -> bool:
        if n not in seen:
            a = attainment(n)
            seen[n] = a is not None and a >= target
        return seen[n]

    if not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def sustainable_rate(curve: Mapping[float, float | None], target: float) -> float:
    """The highest measured rate such that it and every lower measured rate
    reach ``target`` (0.0 if the lowest does not)."""
    best = 0.0
    for rate in sorted(curve):
        a = curve[rate]
        if a is None or a < target:
            break
        best = rate
    return best


def cheapest_pool(attainment: Callable[[Mapping[str, int]], float | None],
                  start: Mapping[str, int], price: Mapping[str, float], types: list[str],
                  target: float = ATTAIN_99, budget: int = 40) -> tuple[dict[str, int], int]:
    """Local search from ``start`` (a pool that meets ``target``): take one
    device away, or trade up to three of one type for one of another, when
    the pool costs less and still meets the target (a cheaper type, or a
    bigger one that takes the load of several); the cheapest such move each
    round, until none helps or ``budget`` runs are spent. Returns the pool and
    the runs made. The result never costs more than ``start``: it is a
    candidate itself."""
    pool = {t: n for t, n in start.items() if n}
    runs = 0

    def cost(p: Mapping[str, int]) -> float:
        return sum(price[t] * n for t, n in p.items())

    while runs < budget:
        moves = []
        for t in sorted(pool):
            moves.append({**pool, t: pool[t] - 1})
            for k in range(1, min(3, pool[t]) + 1):
                less = {**pool, t: pool[t] - k}
                moves += [{**less, u: less.get(u, 0) + 1} for u in types if u != t]
        moves = sorted(({k: v for k, v in m.items() if v} for m in moves),
                       key=lambda m: (cost(m), sorted(m.items())))
        better = None
        for m in moves:
            if cost(m) >= cost(pool) or not m or runs >= budget:
                break
            runs += 1
            a = attainment(m)
            if a is not None and a >= target:
                better = m
                break
        if better is None:
            break
        pool = better
    return pool, runs
