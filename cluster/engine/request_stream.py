"""Streaming one request through an engine shell, and tracking what is in flight.

``run_stream`` is shared by ``generate`` and ``resume``: a fresh request is a
resume from an empty token prefix. Chunks are plain dicts (they cross the
Ray boundary); the first one carries the request description a caller needs
to resume the request on another engine later. A chunk carries every token
made since the last one was sent (``cluster/coalesce.py``): the first token
goes at once, later ones travel together within a 100 ms window.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import aclosing
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.coalesce import batches
from cluster.errors import BadRequestError, PromptTooLongError, RequestAbortedError
from cluster.request_log import request_event
from policies.smoothing import ewma

DEFAULT_MAX_TOKENS = 16
RATE_WINDOW_S = 10.0


@dataclass
class InflightRequest:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    # User sampling params, max_tokens as asked: a dict (token API, gRPC) or
    # a vLLM SamplingParams the front door's OpenAI path built already.
    sampling: Any
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None  # None while waiting for prefill
    abort_reason: str | None = None  # set when the worker ends the request
    moved: bool = False  # evacuated: the caller resumes it on another engine

    def description(self) -> dict:
        """What ``resume`` needs to continue this request elsewhere."""
        return {"request_id": self.request_id, "model": self.model,
                "prompt_token_ids": self.prompt_token_ids, "sampling": self.sampling}


@dataclass
class RequestTracker:
    """In-flight requests and a sliding window of generated tokens."""

    inflight: dict[str, InflightRequest] = field(default_factory=dict)
    _tokens: deque = field(default_factory=deque)  # (time, model, n_tokens)
    # model -> smoothed TTFT and TPOT of its finished requests here, the
    # estimates the controller reads to judge a device overloaded.
    latency: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def get(self, request_id: str) -> InflightRequest | None:
        return self.inflight.get(request_id)

    def count(self, model: str | None) -> int:
        return sum(1 for r in self.inflight.values() if r.model == model)

    def counts(self, model: str) -> dict[str, int]:
        reqs = [r for r in self.inflight.values() if r.model == model]
        running = sum(1 for r in reqs if r.first_token_at is not None)
        return {"running": running, "waiting": len(reqs) - running}

    def record_tokens(self, model: str, n: int) -> None:
        now = time.monotonic()
        self._tokens.append((now, model, n))
        while self._tokens and self._tokens[0][0] < now - RATE_WINDOW_S:
            self._tokens.popleft()

    def observe_latency(self, model: str, ttft_s: float | None, tpot_s: float | None) -> None:
        est = self.latency.setdefault(model, {"ttft_s": None, "tpot_s": None})
        for key, new in (("ttft_s", ttft_s), ("tpot_s", tpot_s)):
            if new is not None:
                est[key] = ewma(est[key], new)

    def tokens_per_s(self, model: str | None) -> float:
        cutoff = time.monotonic() - RATE_WINDOW_S
        n = sum(k for t, m, k in self._tokens if t >= cutoff and (model is None or m == model))
        return n / RATE_WINDOW_S

    async def abort_model(self, model: str, abort: Callable, reason: str) -> int:
        """End every in-flight request of ``model``; their streams raise ``reason``."""
        # Moved requests were handed back to their callers already.
        victims = [r for r in self.inflight.values() if r.model == model and not r.moved]
        for r in victims:
            r.abort_reason = reason
        return await _stop_in_engine(victims, abort)

    async def move_model(self, model: str, abort: Callable) -> int:
        """Stop every in-flight request of ``model`` so its caller resumes it
        elsewhere: each stream ends with a ``moved`` chunk instead of an error."""
        victims = [r for r in self.inflight.values() if r.model == model]
        for r in victims:
            r.moved = True
        return await _stop_in_engine(victims, abort)


async def _stop_in_engine(victims: list[InflightRequest], abort: Callable) -> int:
    """Abort each request in vLLM (``abort`` may be sync or async); how many."""
    for r in victims:
        res = abort(r.request_id)
        if res is not None:
            await res
    return len(victims)


def max_tokens(sampling: Any) -> int:
    """The request's whole output budget: a sampling dict's or a vLLM
    ``SamplingParams``' (the front door's OpenAI path sends those)."""
    if isinstance(sampling, dict):
        return sampling.get("max_tokens", DEFAULT_MAX_TOKENS)
    return sampling.max_tokens


def sampling_params(sampling: Any, already_generated: int):
    """vLLM SamplingParams for the rest of a request, as a delta stream."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    if not isinstance(sampling, dict):  # already validated by vLLM at the front door
        params = sampling.clone()
        params.max_tokens = sampling.max_tokens - already_generated
        params.min_tokens = max(0, (sampling.min_tokens or 0) - already_generated)
        params.output_kind = RequestOutputKind.DELTA
        return params
    params = dict(sampling)
    params["max_tokens"] = params.get("max_tokens", DEFAULT_MAX_TOKENS) - already_generated
    if "min_tokens" in params:
        params["min_tokens"] = max(0, params["min_tokens"] - already_generated)
    try:
        return SamplingParams(**params, output_kind=RequestOutputKind.DELTA)
    except (TypeError, ValueError, VLLMValidationError) as e:
        raise BadRequestError(f"bad sampling parameters: {e}") from None


async def run_stream(tracker: RequestTracker, shell, max_model_len: int,
                     req: InflightRequest, generated: list[int],
                     device: str | None = None) -> AsyncIterator[dict]:
    """Generate ``req`` continuing after ``generated``; yield delta chunks.
    Logs ``started`` and then ``finished``, ``moved`` or ``stopped``
    (``cluster/request_log.py``) with the request's id."""
    ids = req.prompt_token_ids + generated
    if len(ids) >= max_model_len:
        raise PromptTooLongError(
            f"prompt has {len(req.prompt_token_ids)} tokens (+{len(generated)} generated); "
            f"model {req.model!r} has a context of {max_model_len} tokens")
    if req.request_id in tracker.inflight:
        raise BadRequestError(f"request id {req.request_id!r} is already in flight")
    first: dict[str, Any] = {"request": req.description(), "num_generated": len(generated)}
    remaining = max_tokens(req.sampling) - len(generated)
    if remaining <= 0:  # a resume of a request that had already finished
        yield {**first, "token_ids": [], "text": "", "finished": True, "finish_reason": "length"}
        return
    params = sampling_params(req.sampling, len(generated))
    tracker.inflight[req.request_id] = req
    n_generated, finished = len(generated), False
    last_at = None
    request_event("started", req.request_id, model=req.model, device=device,
                  resumed_from=len(generated) or None)
    outcome = "stopped"  # the consumer left or an error broke the stream
    try:
        # Whatever the engine made since the last relay travels as one chunk.
        outputs = _until_ended(shell.generate(ids, params, req.request_id), req)
        async with aclosing(batches(outputs, send_now=lambda out: out.finished)) as groups:
            async for group in groups:
                last_at = time.monotonic()
                if req.first_token_at is None:
                    req.first_token_at = last_at
                token_ids = [t for out in group for t in out.outputs[0].token_ids]
                n_generated += len(token_ids)
                tracker.record_tokens(req.model, len(token_ids))
                last = group[-1].outputs[0]
                finished = group[-1].finished
                if "request" in first:  # prompt tokens vLLM found in its prefix cache
                    first["num_cached_tokens"] = group[0].num_cached_tokens or 0
                chunk = {**first, "token_ids": token_ids,
                         "text": "".join(out.outputs[0].text for out in group),
                         "finished": finished, "finish_reason": last.finish_reason,
                         "stop_reason": last.stop_reason, "num_generated": n_generated}
                if last.logprobs:
                    chunk["logprobs"] = [row for out in group for row in logprob_rows(
                        out.outputs[0].token_ids, out.outputs[0].logprobs, req.sampling)]
                yield chunk
                first = {"num_generated": n_generated}
        if finished:
            outcome = "finished"
            _observe(tracker, req, len(generated), n_generated, last_at)
        if req.abort_reason:
            outcome = "aborted"
            raise RequestAbortedError(f"request {req.request_id!r} aborted: {req.abort_reason}")
        if req.moved and not finished:
            outcome = "moved"
            # Tokens vLLM made after the last yielded chunk are dropped on
            # purpose: the caller resumes from exactly what it has received.
            yield {**first, "moved": True, "token_ids": [], "text": "", "finished": False,
                   "finish_reason": None, "num_generated": n_generated}
    finally:
        request_event(outcome, req.request_id, model=req.model, device=device,
                      generated=n_generated)
        tracker.inflight.pop(req.request_id, None)
        if not finished and not req.abort_reason:
            # The consumer left (cancel/close) or an error broke the stream:
            # make sure vLLM stops spending compute on it.
            await shell.abort(req.request_id)


def logprob_rows(token_ids, logprobs, sampling: Any) -> list[tuple[list[int], list[float], int]]:
    """Per generated token: the sampled token then the top-k ids, their
    logprobs, and the sampled token's rank: vLLM's own row layout
    (``LogprobsLists``), so the front door rebuilds them exactly."""
    k = sampling.get("logprobs") if isinstance(sampling, dict) else sampling.logprobs
    k = k if k is not None and k >= 0 else 0
    rows = []
    for tok, pos in zip(token_ids, logprobs):
        d = dict(pos)
        top = sorted((x for x in d.items() if x[1].rank is not None and x[1].rank <= k),
                     key=lambda x: x[1].rank)[:k]
        rows.append(([tok] + [t for t, _ in top], [d[tok].logprob] + [lp.logprob for _, lp in top],
                     d[tok].rank))
    return rows


def _observe(tracker: RequestTracker, req: InflightRequest, resumed_from: int,
             n_generated: int, last_at: float) -> None:
    """Feed a finished request's TTFT and TPOT to the model's estimates.
    A resumed request's first token came after a re-prefill, not a queue
    wait, so only its TPOT counts."""
    n = n_generated - resumed_from
    tpot = (last_at - req.first_token_at) / (n - 1) if n > 1 else None
    ttft = None if resumed_from else req.first_token_at - req.arrived
    tracker.observe_latency(req.model, ttft, tpot)


async def _until_ended(outputs: AsyncIterator, req: InflightRequest) -> AsyncIterator:
    """vLLM outputs until the worker ends the request (moved or aborted).

    After that, whatever the engine does next no longer matters: more output,
    or an error because the engine was shut down while this stream waited
    for a slow client.
    """
    try:
        async for out in outputs:
            if req.abort_reason or req.moved:
                return
            yield out
    except Exception:
        if not (req.abort_reason or req.moved):
            raise
