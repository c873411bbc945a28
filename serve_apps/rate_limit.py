"""Per-model request rate limit at the front door (token bucket).

Off unless ``rate_limit_rps`` (every model) or ``rate_limits`` (per model,
requests/s) is set. A refused request gets 429 (``RateLimitedError``, with
``Retry-After`` on HTTP); nothing reaches an engine.
"""

from __future__ import annotations

import math
import time

from cluster.errors import RateLimitedError


class RateLimiter:
    def __init__(self, rate_rps: float | None, per_model: dict[str, float] | None = None):
        self.rate = rate_rps
        self.per_model = dict(per_model or {})
        self._buckets: dict[str, tuple[float, float]] = {}  # model -> (tokens, at)

    def check(self, model: str) -> RateLimitedError | None:
        """None if the request may go, else the error to answer with."""
        rate = self.per_model.get(model, self.rate)
        if not rate:
            return None
        burst = max(1.0, 2 * rate)  # absorbs a short burst at twice the rate
        now = time.monotonic()
        tokens, at = self._buckets.get(model, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens >= 1.0:
            self._buckets[model] = (tokens - 1.0, now)
            return None
        self._buckets[model] = (tokens, now)
        return RateLimitedError(
            f"rate limit for model {model!r} is {rate:g} requests/s; retry later",
            retry_after_s=math.ceil((1.0 - tokens) / rate))
