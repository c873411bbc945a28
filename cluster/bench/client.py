"""One benchmark request through the official ``openai`` client (async),
ended as an ``outcomes.Outcome``: what ``shoal bench load`` and ``shoal
bench chaos`` send.

Streams are read as raw SSE lines (``with_streaming_response``) rather
than through the client's chunk iterator, because that iterator stops
silently when the connection ends: it cannot tell a stream that ended with
``data: [DONE]`` from one that was cut, and a cut stream is exactly what
``lost`` counts. Every request has a hard timeout (``asyncio.timeout`` over
the whole exchange, not just the client's per-read timeout).
"""

from __future__ import annotations

import asyncio
import json
import time

from cluster.bench.outcomes import Ending, Outcome, classify_body, classify_stream


def make_client(base_url: str, api_key: str = "unused"):
    """An ``AsyncOpenAI`` with no retries (a retry would hide a refusal)
    and a connection pool big enough to stay open-loop."""
    import httpx
    from openai import AsyncOpenAI

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=2000,
                                                 max_keepalive_connections=200))
    return AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0,
                       http_client=http)


async def send(client, model: str, prompt: list[int] | str, max_tokens: int, streaming: bool,
               timeout_s: float, request_id: str | None = None) -> Outcome:
    """One greedy completion of exactly ``max_tokens`` tokens (``ignore_eos``)."""
    import httpx
    import openai

    sent = time.monotonic()
    kw = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
          "extra_body": {"ignore_eos": True}, "timeout": timeout_s}
    if request_id:
        kw["extra_headers"] = {"X-Request-Id": request_id}
    try:
        async with asyncio.timeout(timeout_s):
            if streaming:
                return await _stream(client, kw, max_tokens, sent)
            out = await client.completions.create(**kw)
    except openai.APIStatusError as e:
        return Outcome(Ending.REFUSED, time.monotonic() - sent, streaming, status=e.status_code,
                       retry_after="retry-after" in e.response.headers)
    except (TimeoutError, openai.APITimeoutError, httpx.TimeoutException):
        return Outcome(Ending.LOST, time.monotonic() - sent, streaming, why="timeout")
    except (openai.APIConnectionError, openai.APIResponseValidationError, httpx.HTTPError,
            json.JSONDecodeError):
        # A stream read through raw lines raises httpx's own errors (a
        # connection cut mid-body: no [DONE], no error event).
        return Outcome(Ending.LOST, time.monotonic() - sent, streaming, why="dropped")
    choice = out.choices[0] if out.choices else None
    tokens = out.usage.completion_tokens if out.usage else 0
    ending, why = classify_body(choice.finish_reason if choice else None, tokens, max_tokens)
    return Outcome(ending, time.monotonic() - sent, False, tokens=tokens, why=why,
                   text=choice.text if choice else "")


async def _stream(client, kw: dict, max_tokens: int, sent: float) -> Outcome:
    first = last = None
    tokens, done, error_event, text = 0, False, False, []
    async with client.completions.with_streaming_response.create(
            stream=True, stream_options={"include_usage": True}, **kw) as resp:
        async for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                error_event = True
                break
            for c in event.get("choices") or ():
                if c.get("text"):
                    last = time.monotonic()
                    first = first or last
                    text.append(c["text"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    ending, why = classify_stream(done, error_event, tokens, max_tokens)
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return Outcome(ending, time.monotonic() - sent, True,
                   ttft_s=None if first is None else first - sent, tpot_s=tpot,
                   tokens=tokens, why=why, text="".join(text))
