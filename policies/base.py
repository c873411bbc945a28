"""The one interface the controller and the simulator call."""

from __future__ import annotations

from typing import Protocol

from policies.actions import Action
from policies.view import ClusterView


class Policy(Protocol):
    name: str

    def decide(self, view: ClusterView, now: float) -> list[Action]:
        """Actions to take now. Deterministic: same view and time, same list."""
        ...
