"""Per-model request rate limit at the front door (token bucket).

Off unless ``rate_limit_rps`` is set. A refused request gets 429 in the
OpenAI error shape with ``Retry-After``; nothing reaches an engine.
"""

from __future__ import annotations

import math
import time

from fastapi.responses import JSONResponse

from cluster.openai_serving import error_body


class RateLimiter:
    def __init__(self, rate_rps: float | None, burst: float | None = None):
        self.rate = rate_rps
        self.burst = burst or (max(1.0, 2 * rate_rps) if rate_rps else 0.0)
        self._buckets: dict[str, tuple[float, float]] = {}  # model -> (tokens, at)

    def check(self, model: str) -> JSONResponse | None:
        """None if the request may go, else the 429 response to send."""
        if not self.rate:
            return None
        now = time.monotonic()
        tokens, at = self._buckets.get(model, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[model] = (tokens - 1.0, now)
            return None
        self._buckets[model] = (tokens, now)
        wait = math.ceil((1.0 - tokens) / self.rate)
        return JSONResponse(
            error_body(f"rate limit for model {model!r} is {self.rate:g} requests/s; retry later",
                       429, "rate_limit_exceeded"),
            status_code=429, headers={"Retry-After": str(wait)})
