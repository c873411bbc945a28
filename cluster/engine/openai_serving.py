"""vLLM's own OpenAI serving layer, run next to each engine shell.

The front door forwards the request body untouched; here vLLM's
``OpenAIServingChat`` / ``OpenAIServingCompletion`` parse, validate, render
the chat template, sample, and shape responses and SSE chunks (usage,
``stop``, ``n``, ``logprobs``, ``seed``, ... as vLLM supports them). Shoal
writes none of the protocol. One set of serving objects is built per shell
(vLLM's ``init_app_state``) and renamed when another model is swapped into
the shell: same family means same tokenizer and shapes.

Items yielded to the caller (they cross the Ray boundary):

- ``{"status": 200, "body": {...}}``: a complete (non-streaming) response;
- ``{"status": 4xx/5xx, "body": {"error": {...}}}``: vLLM's error shape;
- ``{"status": 200, "stream": True}`` then SSE strings (``data: ...\\n\\n``).

These requests cannot be resumed on another engine (vLLM's serving state
lives here), so evacuating a model drains them instead of moving them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from cluster.engine.request_stream import InflightRequest, RequestTracker
from cluster.openai_protocol import CHAT, COMPLETIONS, error_body, sse_error


class OpenAIServing:
    """vLLM's serving objects for one engine, served under one model name."""

    def __init__(self, state: Any, model_path: str):
        self.state = state
        self.model_path = model_path

    @classmethod
    async def create(cls, engine: Any, model_path: str, name: str) -> "OpenAIServing":
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(
            ["--model", model_path, "--served-model-name", name])
        state = State()
        await init_app_state(engine, state, args, await engine.get_supported_tasks())
        return cls(state, model_path)

    def serve_as(self, name: str, model_path: str) -> None:
        """The shell now holds ``name``: answer (and label responses) as it."""
        from vllm.entrypoints.openai.models.protocol import BaseModelPath

        self.state.openai_serving_models.base_model_paths[:] = [
            BaseModelPath(name=name, model_path=model_path)]

    def _handler(self, kind: str):
        if kind == CHAT:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
            return ChatCompletionRequest, self.state.openai_serving_chat.create_chat_completion
        if kind == COMPLETIONS:
            from vllm.entrypoints.openai.completion.protocol import CompletionRequest
            return CompletionRequest, self.state.openai_serving_completion.create_completion
        raise ValueError(f"unknown OpenAI endpoint {kind!r}")

    async def handle(self, tracker: RequestTracker, model: str, kind: str,
                     body: dict) -> AsyncIterator[dict | str]:
        from pydantic import ValidationError

        request_cls, create = self._handler(kind)
        request_id = str(body.get("request_id") or uuid.uuid4().hex)
        try:
            request = request_cls.model_validate({**body, "request_id": request_id})
        except ValidationError as e:
            yield error_item(_validation_message(e), HTTPStatus.BAD_REQUEST)
            return
        req = InflightRequest(request_id, model, [], {}, resumable=False)
        tracker.inflight[request_id] = req
        try:
            try:
                result = await create(request, None)
            except Exception as e:  # vLLM raises validation errors (prompt too long, ...)
                yield error_item(e)
                return
            if hasattr(result, "error"):  # vLLM's ErrorResponse
                yield {"status": result.error.code, "body": result.model_dump(mode="json")}
                return
            if not hasattr(result, "__aiter__"):
                yield {"status": 200, "body": result.model_dump(mode="json", exclude_none=True)}
                return
            yield {"status": 200, "stream": True}
            try:
                async for sse in result:
                    if req.abort_reason:
                        yield sse_error(req.abort_reason, HTTPStatus.SERVICE_UNAVAILABLE)
                        break
                    if req.first_token_at is None:
                        req.first_token_at = time.monotonic()
                    yield sse
            finally:
                await result.aclose()  # vLLM aborts the engine request if unfinished
        finally:
            tracker.inflight.pop(request_id, None)


def error_item(message: str | Exception, status: int = 400) -> dict:
    body = error_body(message, status)
    return {"status": body["error"]["code"], "body": body}


def _validation_message(e) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
