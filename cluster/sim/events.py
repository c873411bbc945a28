"""The simulated clock: a queue of timed callbacks.

Determinism: events at the same time run in the order they were
scheduled (a sequence number breaks ties), so a run depends only on its
inputs and seed, never on hashing or wall time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class EventQueue:
    def __init__(self):
        self.now = 0.0
        self.processed = 0  # events run so far (the simulator's speed is reported per event)
        self._heap: list[tuple[float, int, Callable, tuple]] = []
        self._seq = 0

    def at(self, time_s: float, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` at ``time_s`` (never before now)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(time_s, self.now), self._seq, fn, args))

    def run(self, until_s: float, stop: Callable[[], bool] | None = None) -> None:
        """Run events in time order up to ``until_s``, or until ``stop()`` says so
        (asked after each event)."""
        heap = self._heap
        while heap and heap[0][0] <= until_s:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            fn(*args)
            self.processed += 1
            if stop is not None and stop():
                return
        self.now = max(self.now, until_s)

    def __len__(self) -> int:
        return len(self._heap)
