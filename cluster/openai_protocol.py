"""The few OpenAI names the engine and the front door share: the endpoint
kinds, and OpenAI-shaped error bodies built by vLLM's own helper.

The engine runs vLLM's serving layer; the front door answers some errors
itself. Both import this leaf module, so neither imports the other.
"""

from __future__ import annotations

import json
from http import HTTPStatus

CHAT, COMPLETIONS = "chat", "completions"  # /v1/chat/completions, /v1/completions

def error_body(message: str | Exception, status: int = 400, err_type: str | None = None) -> dict:
    """An OpenAI-shaped error body, built by vLLM's own helper."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    if isinstance(message, Exception):
        resp = create_error_response(message)
    else:
        resp = create_error_response(message, err_type or HTTPStatus(status).phrase.replace(" ", ""),
                                     HTTPStatus(status))
    return resp.model_dump(mode="json")


def sse_error(message: str, status: int) -> str:
    return f"data: {json.dumps(error_body(message, status))}\n\n"


