"""What a model's requests run on: one interface, two implementations.

- ``DedicatedServing``: the model has an engine shell of its own.
- ``Lane`` (``cluster/engine/timeshare.py``): the model's view of a
  time-shared shell, whose scheduler runs its requests in its turns.

The engine worker's request entry points (``generate``, ``resume``) take a ``Serving`` and never ask which of the two they hold.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from cluster.engine.shell import EngineShell


class Serving(Protocol):
    def generate(self, prompt_token_ids: list[int], sampling: Any,
                 request_id: str) -> AsyncIterator[Any]:
        """vLLM delta outputs of one engine request."""

    async def abort(self, request_id: str) -> None:
        """Stop the request inside the engine (safe if it already ended)."""

    def tokenize(self, text: str) -> list[int]:
        ...


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
