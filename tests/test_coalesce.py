"""SSE events that cross Ray together: the first at once, later ones joined
while they come within the interval; nothing lost, nothing reordered."""

from __future__ import annotations

import asyncio

from cluster.engine import coalesce
from cluster.engine.coalesce import sse_batches


def run(items, clock, interval_s=0.01):
    async def source():
        for at, item in items:
            clock[0] = at
            yield item

    async def collect():
        return [x async for x in sse_batches(source(), interval_s)]
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(collect())
    finally:
        loop.close()


def test_first_event_at_once_then_joined_within_the_interval(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(coalesce.time, "monotonic", lambda: clock[0])
    events = [(0.000, {"status": 200, "stream": True}), (0.001, "data: 1\n\n"),
              (0.003, "data: 2\n\n"), (0.006, "data: 3\n\n"), (0.012, "data: 4\n\n"),
              (0.013, "data: [DONE]\n\n")]
    out = run(events, clock)
    assert out == [{"status": 200, "stream": True}, "data: 1\n\n",
                   "data: 2\n\ndata: 3\n\ndata: 4\n\n",  # sent at 0.012, 11 ms after "1"
                   "data: [DONE]\n\n"]  # held until the end, then flushed
    assert "".join(x for x in out if isinstance(x, str)) == \
        "".join(x for _, x in events if isinstance(x, str))


def test_slow_events_each_travel_alone(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(coalesce.time, "monotonic", lambda: clock[0])
    events = [(i * 0.05, f"data: {i}\n\n") for i in range(4)]
    assert run(events, clock) == [x for _, x in events]
