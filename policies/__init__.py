"""The brain of Shoal: pure placement policies (no Ray, no vLLM, no I/O).

A policy reads a ``ClusterView`` and returns actions; ``plan.apply`` says
what each action does to a view. The controller and the simulator both call
``make_policy(name)`` and then ``policy.decide(view, now)``.
"""

from __future__ import annotations

from policies.actions import (Action, Load, Migrate, Park, RequestCapacity, ScaleIn, ScaleOut,
                              Swap, Unload, Wake)
from policies.base import Policy
from policies.baselines import DedicatedPolicy, LRUScaleToZeroPolicy
from policies.default import DefaultConfig, DefaultPolicy
from policies.demand import DemandEstimator
from policies.plan import InvalidAction, Planner, apply, apply_all, is_valid
from policies.view import (ACTIVE, LOADING, PARKED, ClusterView, Demand, DeviceView, ModelView,
                           Placement)

# name -> constructor taking the policy's config as keyword arguments.
POLICIES = {
    DefaultPolicy.name: DefaultPolicy,
    DedicatedPolicy.name: DedicatedPolicy,
    LRUScaleToZeroPolicy.name: LRUScaleToZeroPolicy,
}


def make_policy(name: str, **config) -> Policy:
    """The policy registered as ``name``, built with ``config``.

    ``make_policy("default", hot_rate=2.0)``, ``make_policy("lru",
    keep_alive_s=60)``, ``make_policy("dedicated")``.
    """
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    try:
        return cls(**config)
    except TypeError as e:  # an unknown config key: say which policy refused it
        raise ValueError(f"bad config for policy {name!r}: {e}") from None


__all__ = [
    "ACTIVE", "LOADING", "PARKED", "POLICIES",
    "Action", "ClusterView", "DedicatedPolicy", "DefaultConfig", "DefaultPolicy", "Demand",
    "DemandEstimator", "DeviceView", "InvalidAction", "LRUScaleToZeroPolicy", "Load",
    "Migrate", "ModelView", "Park", "Placement", "Planner", "Policy", "RequestCapacity",
    "ScaleIn", "ScaleOut", "Swap", "Unload", "Wake", "apply", "apply_all", "is_valid",
    "make_policy",
]
