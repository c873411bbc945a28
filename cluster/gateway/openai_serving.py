"""vLLM's own OpenAI serving layer for one catalog model, at the front door.

The front door hands the request body over untouched; vLLM's
``OpenAIServingChat`` / ``OpenAIServingCompletion`` parse, validate, render
the chat template, build the sampling parameters, and shape responses and
SSE chunks (usage, ``stop``, ``n``, ``logprobs``, ``seed``, ... as vLLM
supports them). Shoal writes none of the protocol. The engine client under
them (``engine_client.py``) streams token ids from whichever engine holds
the model, so every request here can be preempted, moved and resumed.

Items yielded to the caller:

- ``{"status": 200, "body": {...}}``: a complete (non-streaming) response;
- ``{"status": 4xx/5xx, "body": {"error": {...}}}``: vLLM's error shape;
- ``{"status": 200, "stream": True}`` then SSE strings (``data: ...\\n\\n``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from cluster.errors import ShoalError
from cluster.openai_protocol import CHAT, COMPLETIONS, error_body


class OpenAIServing:
    """vLLM's serving objects over one engine client, under one model name."""

    def __init__(self, state: Any):
        self.state = state

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
        return cls(state)

    def _handler(self, kind: str):
        if kind == CHAT:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
            return ChatCompletionRequest, self.state.openai_serving_chat.create_chat_completion
        if kind == COMPLETIONS:
            from vllm.entrypoints.openai.completion.protocol import CompletionRequest
            return CompletionRequest, self.state.openai_serving_completion.create_completion
        raise ValueError(f"unknown OpenAI endpoint {kind!r}")

    async def handle(self, kind: str, body: dict) -> AsyncIterator[dict | str]:
        from pydantic import ValidationError

        request_cls, create = self._handler(kind)
        request_id = str(body.get("request_id") or uuid.uuid4().hex)
        try:
            request = request_cls.model_validate({**body, "request_id": request_id})
        except ValidationError as e:
            yield error_item(_validation_message(e), HTTPStatus.BAD_REQUEST)
            return
        try:
            result = await create(request, None)
        except ShoalError as e:  # the request could not be served (or resumed) anywhere
            yield error_item(str(e), e.status)
            return
        except Exception as e:  # vLLM's validation errors (prompt too long, ...)
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
                yield sse
        finally:
            await result.aclose()  # closing aborts the request's engine streams


def error_item(message: str | Exception, status: int = 400) -> dict:
    body = error_body(message, status)
    return {"status": body["error"]["code"], "body": body}


def _validation_message(e) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
