"""Tokens a request used, counted where they pass: the engine client.

The front door needs each request's prompt and completion tokens for
tenant token limits and usage counters, streaming or not, and also for a
client that left mid-stream (its tokens were spent all the same). vLLM's
serving layer reports usage only in a non-streaming body or when the
client asks for it, so the count is taken one layer down: the front door
puts a fresh ``Usage`` in ``REQUEST_USAGE`` before it hands the request to
the serving layer, and ``ShoalEngineClient.generate`` (running in that
request's task, or a task started from it, which copies the context) adds
the prompt's tokens once and every token the engines send.

These are the tokens the engines made: when a stop string ends a request
inside a chunk, a few more than vLLM's reported ``completion_tokens``.

A context variable, not an argument, because vLLM's serving classes sit
between the two and pass no such thing through.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class Usage:
    prompt_tokens: int = 0  # summed over the request's prompts (a completions list)
    completion_tokens: int = 0  # every choice's tokens (n > 1 counts each)

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# The current request's Usage at the front door; None outside a request.
REQUEST_USAGE: ContextVar[Usage | None] = ContextVar("shoal_request_usage", default=None)


def count_into(usage: Usage) -> None:
    """Count the current request's tokens into ``usage`` (the front door
    calls this in the request's task, before the serving layer runs).
    A function, so callers never hold the context variable itself: Ray
    Serve pickles the ingress's globals, and a ContextVar does not pickle."""
    REQUEST_USAGE.set(usage)
