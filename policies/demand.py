"""Per-model arrival rate, exponentially decayed, for building ``Demand``.

The controller calls ``observe`` for every request that arrives and
``demand`` when it builds a view. There is no clock inside: every call
takes ``now`` (seconds on any monotonic clock), so the simulator and the
tests drive it with their own time and get the same numbers every run.

The estimate: each arrival adds ``n`` to a counter that halves every
``half_life_s``; the rate is that counter times ``ln 2 / half_life_s``.
For a steady stream of ``r`` requests per second the counter settles at
``r * half_life_s / ln 2``, so the rate settles at ``r`` (unbiased in steady
state), and after traffic stops it halves every ``half_life_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies.view import Demand


@dataclass
class _Track:
    count: float  # decayed number of arrivals, as of ``at``
    at: float  # time the count was last brought up to date
    last_used: float  # latest arrival time seen


class DemandEstimator:
    """Decayed arrival rates per model. Mutable, owned by the controller
    (or simulator); policies only ever see the ``Demand`` it builds."""

    def __init__(self, half_life_s: float = 60.0):
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be positive, got {half_life_s}")
        self.half_life_s = half_life_s
        self._tracks: dict[str, _Track] = {}

    def _decay(self, dt_s: float) -> float:
        return 0.5 ** (max(dt_s, 0.0) / self.half_life_s)

    def observe(self, model: str, now: float, n: int = 1) -> None:
        """``n`` requests for ``model`` arrived at ``now``.

        A late report (``now`` before the latest one) is decayed to the
        tracked time instead of moving time backwards.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        t = self._tracks.get(model)
        if t is None:
            self._tracks[model] = _Track(float(n), now, now)
            return
        if now >= t.at:
            t.count = t.count * self._decay(now - t.at) + n
            t.at = now
        else:
            t.count += n * self._decay(t.at - now)
        t.last_used = max(t.last_used, now)

    def rate(self, model: str, now: float) -> float:
        """Smoothed arrivals per second at ``now`` (0.0 for an unseen model)."""
        t = self._tracks.get(model)
        if t is None:
            return 0.0
        return t.count * self._decay(now - t.at) * math.log(2) / self.half_life_s

    def last_used(self, model: str) -> float:
        """Latest arrival time, ``-inf`` if none was ever seen."""
        t = self._tracks.get(model)
        return t.last_used if t is not None else float("-inf")

    def demand(self, model: str, now: float, queue: int = 0, inflight: int = 0) -> Demand:
        """The ``Demand`` a view carries for ``model``: this estimator's rate and
        last use, plus the queue and in-flight counts the caller measured."""
        return Demand(rate=self.rate(model, now), queue=queue, inflight=inflight,
                      last_used=self.last_used(model))

    def models(self) -> tuple[str, ...]:
        """Every model seen so far, sorted."""
        return tuple(sorted(self._tracks))

    def forget(self, model: str) -> None:
        """Drop a model's history (e.g. it left the catalog)."""
        self._tracks.pop(model, None)
