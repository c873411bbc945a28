"""Small helpers shared by the integration tests."""

from __future__ import annotations

import time

LONG_PROMPT = ("Shoal serves many language models from one shared pool of accelerators. "
               "Most models in a large catalog are cold and share devices.")
# More than two KV blocks (vLLM's CPU block size is 128 tokens): only a
# prompt with a full block can be served from the prefix cache, so only such
# a prompt shows whether the cache was reset on a swap.
CACHED_PROMPT = " ".join([LONG_PROMPT] * 6)
GREEDY = {"temperature": 0.0, "max_tokens": 20}


def collect(gen) -> tuple[list[int], list[dict]]:
    """Drain a worker stream: (all generated token ids, chunks)."""
    import ray

    chunks = [ray.get(ref) for ref in gen]
    return [t for c in chunks for t in c["token_ids"]], chunks


def wait_until(pred, timeout_s: float = 30.0, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s} s")
