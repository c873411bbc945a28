"""What the controller has done, counted for ``/metrics``: actions by model
and kind (evictions apart), and a histogram of in-place swap latencies."""

from __future__ import annotations

from collections import Counter

from cluster.engine.contract import ModelStatus
from policies.actions import EVICTION_REASON

SWAP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf"))
_KIND = {"Load": "load", "ScaleOut": "load", "Wake": "load", "Swap": "swap",
         "Migrate": "migrate", "Park": "park", "Unload": "unload", "ScaleIn": "unload",
         "RequestCapacity": "capacity_request", "SetCapacity": "capacity_request",
         "ReleaseDevice": "release_device", "ReclaimDevice": "reclaim_device"}


class ActionCounts:
    def __init__(self):
        self.actions: Counter[str] = Counter()  # "model|kind" -> executed actions
        self.swap_hist = [0] * len(SWAP_BUCKETS_S)  # cumulative, Prometheus style
        self.swap_sum_s = 0.0

    def count(self, action, result) -> None:
        """One action that succeeded, with what the worker reported."""
        kind = _KIND.get(type(action).__name__, type(action).__name__.lower())
        if kind in ("park", "unload") and action.reason.startswith(EVICTION_REASON):
            kind = "evict"
        model = getattr(action, "model", None) or getattr(action, "for_model", "")
        self.actions[f"{model}|{kind}"] += 1
        if kind == "swap" and isinstance(result, ModelStatus) and result.last_swap_s is not None:
            self.swap_sum_s += result.last_swap_s
            for i, bound in enumerate(SWAP_BUCKETS_S):
                self.swap_hist[i] += result.last_swap_s <= bound

    def snapshot(self) -> dict:
        return {"actions": dict(self.actions),
                "swap_seconds": {"buckets": list(zip(SWAP_BUCKETS_S, self.swap_hist)),
                                 "sum": self.swap_sum_s}}
