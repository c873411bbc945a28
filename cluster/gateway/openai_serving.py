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

import logging
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from cluster.errors import ShoalError, root_cause
from cluster.openai_protocol import CHAT, COMPLETIONS, error_body

log = logging.getLogger(__name__)


class OpenAIServing:
    """vLLM's serving objects over one engine client, under one model name."""

    def __init__(self, state: Any):
        self.state = state

    @classmethod
    async def create(cls, engine: Any, model_path: str, name: str) -> "OpenAIServing":
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        state = State()
        await init_app_state(engine, state, serving_args(model_path, name),
                             await engine.get_supported_tasks())
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
        except Exception as e:  # noqa: BLE001 - vLLM's validators raise their own errors
            # (VLLMValidationError from a "before" validator is no
            # ValidationError). Whatever a body's validation raises, the body
            # is at fault: a 400, never a 500.
            yield body_error_item(e)
            return
        try:
            result = await create(request, None)
        except ShoalError as e:  # the request could not be served (or resumed) anywhere
            yield error_item(str(e), e.status)
            return
        except Exception as e:  # vLLM's validation errors (prompt too long, ...)
            yield error_item(client_exception(e))
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


# What a request may not do, whatever vLLM's defaults become: bring its own
# chat template (a Jinja program, or a path vLLM would read), read local
# media files, send tensors to unpickle (prompt embeddings), name
# logits-processor classes to import, or run a checkpoint's own code.
# ``tests/test_openai_serving_args.py`` checks the parsed values.
SAFE_SERVING = {"trust_request_chat_template": False, "allowed_local_media_path": "",
                "enable_prompt_embeds": False, "logits_processor_pattern": None,
                "trust_remote_code": False}


def serving_args(model_path: str, name: str):
    """vLLM's OpenAI server arguments for one catalog model at the front
    door: its defaults, with ``SAFE_SERVING`` enforced."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", model_path, "--served-model-name", name])
    for key, value in SAFE_SERVING.items():
        setattr(args, key, value)
    return args


def client_exception(e: BaseException) -> BaseException:
    """What vLLM's serving layer may show a client of ``e``, an error from
    the engines' side (the router, a worker, Ray): Ray's wrappers carry the
    actor id, pid, node address and the remote traceback in their message,
    so the client gets the original error inside them instead. A
    ShoalError keeps its message and status (as vLLM's GracefulHTTPError,
    which its error responses and stream error events honour); a
    ValueError/TypeError the engine raised about the request stays a 400
    with its own message; anything else is logged and becomes a retryable
    503 that names nothing internal."""
    from vllm.exceptions import GracefulHTTPError, RetryableRequestError, VLLMError

    root = root_cause(e)
    if isinstance(root, ShoalError):
        return GracefulHTTPError(str(root), HTTPStatus(root.status))
    if isinstance(root, (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError)) \
            and not _is_ray_error(root):
        return root
    log.error("request failed on the engine side: %r", e)
    return RetryableRequestError("the engine serving this request failed; retry the request")


def _is_ray_error(e: BaseException) -> bool:
    # RayTaskError(ValueError) is a ValueError too, whose message carries
    # Ray's header and the remote traceback: unwrap it (root_cause) first.
    return any(c.__module__.startswith("ray.") for c in type(e).__mro__)


def error_item(message: str | Exception, status: int = 400) -> dict:
    body = error_body(message, status)
    return {"status": body["error"]["code"], "body": body}


def body_error_item(e: Exception) -> dict:
    """An error raised while reading the client's body, as a 4xx (vLLM's
    status for it when it names one, else 400), its message sanitized by
    vLLM's helper."""
    item = error_item(e)
    if item["status"] >= 500:
        item = error_item(item["body"]["error"]["message"], HTTPStatus.BAD_REQUEST)
    return item


def _validation_message(e) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
