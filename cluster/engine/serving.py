"""What a model's requests run on: one interface, two implementations.

- ``DedicatedServing``: the model has an engine shell of its own.
- ``Lane`` (``cluster/engine/timeshare.py``): the model's view of a
  time-shared shell, whose scheduler runs its requests in its turns.

The engine worker's request entry points (``generate``, ``resume``,
``openai``) take a ``Serving`` and never ask which of the two they hold.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, AsyncContextManager, Protocol

from cluster.engine.shell import EngineShell
from cluster.errors import ModelNotActiveError


class Serving(Protocol):
    def generate(self, prompt_token_ids: list[int], sampling: Any,
                 request_id: str) -> AsyncIterator[Any]:
        """vLLM delta outputs of one engine request."""

    async def abort(self, request_id: str) -> None:
        """Stop the request inside the engine (safe if it already ended)."""

    def tokenize(self, text: str) -> list[int]:
        ...

    def openai_layer(self) -> AsyncContextManager[Any]:
        """vLLM's OpenAI serving objects for this model, held for one request."""


class DedicatedServing:
    """A model alone in its engine shell."""

    def __init__(self, shell: EngineShell, model: str, model_path: str):
        self.shell, self.model, self.model_path = shell, model, model_path

    def generate(self, prompt_token_ids: list[int], sampling: Any, request_id: str):
        return self.shell.generate(prompt_token_ids, sampling, request_id)

    async def abort(self, request_id: str) -> None:
        await self.shell.abort(request_id)

    def tokenize(self, text: str) -> list[int]:
        return self.shell.tokenize(text)

    @asynccontextmanager
    async def openai_layer(self):
        layer = await self.shell.openai(self.model, self.model_path)
        if self.shell.resident != self.model:  # swapped out while it was built
            raise ModelNotActiveError(f"model {self.model!r} left its engine; retry")
        # The caller registers its request before its next await, so a swap
        # (which needs the model idle) cannot slip in between.
        yield layer
