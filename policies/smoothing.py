"""Smoothed estimates from noisy measurements (step times, switch costs,
TTFT and TPOT). Pure arithmetic: the engine's schedulers and a simulator
smooth the same way."""

from __future__ import annotations

EWMA_WEIGHT = 0.2  # weight of one new sample in the smoothed estimates


def ewma(old: float | None, new: float, weight: float = EWMA_WEIGHT) -> float:
    """Exponentially weighted moving average; the first sample is taken as is."""
    return new if old is None else (1 - weight) * old + weight * new
