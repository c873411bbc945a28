"""Fewer, larger messages for a token stream crossing Ray.

Every item a Ray streaming generator yields is one message (serialized,
sent, awaited). An OpenAI stream yields one SSE event per engine step, so
at concurrency the messages, not the tokens, cost the CPU. ``sse_batches``
passes the first event at once (time to first token is untouched) and
after it sends what arrives within ``interval_s`` of the last send as one
string: the number of messages per request follows its duration, not its
token count.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

SSE_INTERVAL_S = 0.01


async def sse_batches(items: AsyncIterator[dict | str],
                      interval_s: float = SSE_INTERVAL_S) -> AsyncIterator[dict | str]:
    """Dicts (status items) pass as they are; SSE strings are joined. An
    event is held at most until the next one arrives or the stream ends."""
    held: list[str] = []
    sent_at: float | None = None  # None until the first event went out
    async for item in items:
        if not isinstance(item, str):
            if held:
                yield "".join(held)
                held.clear()
            yield item
            continue
        held.append(item)
        now = time.monotonic()
        if sent_at is None or now - sent_at >= interval_s:
            yield "".join(held)
            held.clear()
            sent_at = now
    if held:
        yield "".join(held)
