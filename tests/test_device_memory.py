"""Device memory accounting: check-then-act, a refusal changes nothing."""

from __future__ import annotations

import pytest

from cluster.engine.device import DeviceMemory
from cluster.errors import OverBudgetError

MiB = 2**20


def test_reserve_until_full_then_refuse_without_change():
    mem = DeviceMemory(100 * MiB)
    mem.reserve("s0", 60 * MiB, "loading a")
    assert mem.can_reserve(40 * MiB) and not mem.can_reserve(40 * MiB + 1)
    with pytest.raises(OverBudgetError, match=r"needs 50.0 MiB .* 40.0 MiB free of 100.0 MiB.*s0=60.0"):
        mem.reserve("s1", 50 * MiB, "loading b")
    assert mem.reservations == {"s0": 60 * MiB} and mem.used_bytes == 60 * MiB
    mem.release("s0")
    mem.release("s0")  # idempotent
    assert mem.free_bytes == 100 * MiB


def test_a_holder_cannot_reserve_twice():
    mem = DeviceMemory(100 * MiB)
    mem.reserve("s0", MiB, "x")
    with pytest.raises(ValueError, match="already holds"):
        mem.reserve("s0", MiB, "x")
