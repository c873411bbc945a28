"""Stream items grouped by time (``cluster/coalesce.py``): the first at once,
later ones joined while they come within the interval, a held group sent on
a timer even when no next item comes; nothing lost, nothing reordered.
Real time with wide margins: a 200 ms window, items 1 ms or 500 ms apart."""

from __future__ import annotations

import asyncio
import time

from cluster.coalesce import batches, sse_batches

WINDOW_S = 0.2


def run(coro):
    loop = asyncio.new_event_loop()  # (asyncio.run would leave no loop for later tests)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def source(items):
    """``items`` as (delay before it, item)."""
    for delay, item in items:
        await asyncio.sleep(delay)
        yield item


async def timed(groups):
    t0, out = time.monotonic(), []
    async for g in groups:
        out.append((round(time.monotonic() - t0, 1), g))
    return out


def test_first_at_once_then_joined_within_the_window_and_sent_on_a_timer():
    items = [(0, 1), (0.001, 2), (0.001, 3), (0.5, 4), (0.001, 5), (0.5, 6)]
    out = run(timed(batches(source(items), WINDOW_S)))
    # 1 at once; 2 and 3 held, sent when the window closes (no next item in
    # time); 4 alone (a window after the last send); 5 on its timer; 6 alone.
    assert [g for _, g in out] == [[1], [2, 3], [4], [5], [6]]
    assert [t for t, _ in out] == [0.0, 0.2, 0.5, 0.7, 1.0]


def test_send_now_ends_a_group_at_once_and_the_next_item_goes_alone():
    items = [(0, "a"), (0.001, "b"), (0.001, "END"), (0.001, "c"), (0.001, "d"), (0.5, "e")]
    out = run(timed(batches(source(items), WINDOW_S, send_now=lambda x: x == "END")))
    assert out == [(0.0, ["a"]), (0.0, ["b", "END"]), (0.0, ["c"]), (0.2, ["d"]), (0.5, ["e"])]


def test_sse_events_are_joined_and_a_status_item_passes_alone_in_order():
    events = [(0, {"status": 200, "stream": True}), (0.001, "data: 1\n\n"),
              (0.001, "data: 2\n\n"), (0.001, "data: 3\n\n"), (0.001, "data: [DONE]\n\n")]
    out = run(timed(sse_batches(source(events), WINDOW_S)))
    assert [x for _, x in out] == [{"status": 200, "stream": True}, "data: 1\n\n",
                                   "data: 2\n\ndata: 3\n\ndata: [DONE]\n\n"]


def test_a_consumer_that_leaves_stops_the_source():
    stopped = []

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.001)
                yield 1
        finally:
            stopped.append(True)

    async def take_two():
        gen = batches(endless(), WINDOW_S)
        got = [await gen.__anext__(), await gen.__anext__()]
        await gen.aclose()
        await asyncio.sleep(0.01)
        return got
    assert run(take_two())[0] == [1]
    assert stopped == [True]
