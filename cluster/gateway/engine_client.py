"""vLLM's engine-client interface, served by Shoal's resumable token streams.

vLLM's own OpenAI serving classes (chat, completions) run at the front door
over a ``ShoalEngineClient`` instead of next to one engine. They parse
requests, render chat templates and tokenize here, then call
``generate()``, which streams token ids from whichever engine worker holds
the model through ``Router.stream``: preempted on a time-shared device,
moved by a migration or an evacuation, resumed after a worker dies. The
worker holds no OpenAI state, so nothing is lost when a request moves.

What AsyncLLM's front end does in its own process happens here, with
vLLM's own parts, fed every token whichever engine made it:

- ``InputProcessor``: validation, generation-config defaults, request ids;
- ``ParentRequest``: ``n > 1`` as ``n`` child requests (``seed + i``);
- ``OutputProcessor``: detokenization, stop strings (so one spanning a
  preemption or a move is still found), logprobs, the ``RequestOutput``s.

The engines get each child as ``n = 1``, no stop strings, no
detokenization: token ids (and logprob rows) are all that crosses Ray.
"""

from __future__ import annotations

import asyncio
from copy import copy
from typing import Any

from vllm.engine.protocol import EngineClient
from vllm.outputs import STREAM_FINISHED
from vllm.renderers.inputs.preprocess import extract_prompt_components
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine import EngineCoreOutput, FinishReason
from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector
from vllm.v1.engine.parallel_sampling import ParentRequest
from vllm.v1.metrics.stats import PrefillStats

from cluster.gateway.openai_serving import client_exception
from cluster.gateway.usage import REQUEST_USAGE, Usage

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
           "abort": FinishReason.ABORT}


class ShoalEngineClient(EngineClient):
    def __init__(self, model: str, vllm_config: Any, renderer: Any, input_processor: Any,
                 router: Any):
        self.model = model  # the catalog name every request here is for
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.renderer = renderer
        self.input_processor = input_processor
        self.output_processor = OutputProcessor(renderer.tokenizer, log_stats=False)
        self.router = router  # follows the request across preemptions, moves, deaths

    # ---------------------------------------------------------------- serving
    async def generate(self, prompt, sampling_params, request_id, *, prompt_text=None,
                       lora_request=None, tokenization_kwargs=None, trace_headers=None,
                       priority=0, data_parallel_rank=None, session_id=None, kv_hints=None,
                       reasoning_ended=None, reasoning_parser_kwargs=None):
        request = self.input_processor.process_inputs(
            request_id, prompt, sampling_params, supported_tasks=("generate",),
            lora_request=lora_request, tokenization_kwargs=tokenization_kwargs,
            trace_headers=trace_headers, priority=priority, session_id=session_id,
            kv_hints=kv_hints)
        if prompt_text is None:
            prompt_text, _, _ = extract_prompt_components(self.model_config, prompt)
        if reasoning_ended is not None:
            request.reasoning_ended = reasoning_ended
        if reasoning_parser_kwargs is not None:
            request.reasoning_parser_kwargs = reasoning_parser_kwargs
        self.input_processor.assign_request_id(request)
        params = request.params
        usage = REQUEST_USAGE.get()  # the front door's count for this request
        if usage is not None:
            usage.prompt_tokens += len(request.prompt_token_ids or ())
        queue = RequestOutputCollector(params.output_kind, request.request_id)
        children = self._children(request, params)
        for child, parent, index in children:
            self.output_processor.add_request(child, prompt_text, parent, index, queue)
        pumps = [asyncio.ensure_future(self._pump(child, queue, usage))
                 for child, _, _ in children]
        try:
            finished = False
            while not finished:
                out = queue.get_nowait() or await queue.get()
                finished = out.finished
                if out is not STREAM_FINISHED:
                    yield out
        except (asyncio.CancelledError, GeneratorExit):
            self.output_processor.abort_requests([queue.request_id], internal=True)
            raise
        finally:
            for p in pumps:  # closing a stream aborts its engine request
                p.cancel()

    @staticmethod
    def _children(request, params) -> list[tuple[Any, ParentRequest | None, int]]:
        """``n`` child requests for ``n > 1`` (as AsyncLLM fans them out)."""
        if params.n == 1:
            return [(request, None, 0)]
        parent = ParentRequest(request)
        out = []
        for index in range(params.n):
            child_id, child_params = parent.get_child_info(index)
            child = request if index == params.n - 1 else copy(request)
            child.request_id, child.sampling_params = child_id, child_params
            out.append((child, parent, index))
        return out

    async def _pump(self, child, queue: RequestOutputCollector, usage: Usage | None) -> None:
        """One child's tokens from the engines into vLLM's output processor
        (and into the request's ``usage``, when the front door counts it)."""
        remote = child.sampling_params.clone()
        remote.n, remote.stop, remote.detokenize = 1, [], False
        remote.output_kind = RequestOutputKind.DELTA
        first = True
        try:
            async for chunk in self.router.stream(
                    self.model, prompt_token_ids=list(child.prompt_token_ids), sampling=remote,
                    request_id=child.request_id):
                done = chunk["finished"]
                if usage is not None:
                    usage.completion_tokens += len(chunk["token_ids"])
                if not chunk["token_ids"] and not done:
                    continue
                out = EngineCoreOutput(
                    request_id=child.request_id, new_token_ids=list(chunk["token_ids"]),
                    new_logprobs=_logprobs(chunk.get("logprobs")),
                    finish_reason=_FINISH.get(chunk["finish_reason"], FinishReason.STOP)
                    if done else None,
                    stop_reason=chunk.get("stop_reason") if done else None,
                    prefill_stats=PrefillStats(
                        num_prompt_tokens=len(child.prompt_token_ids),
                        num_cached_tokens=chunk.get("num_cached_tokens") or 0)
                    if first else None)
                first = False
                result = self.output_processor.process_outputs([out])
                if done or result.reqs_to_abort:  # finished, or a stop string ended it
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the request's consumer raises it
            queue.put(client_exception(e))  # without Ray's internals

    async def abort(self, request_id, internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.output_processor.abort_requests(ids, internal=internal)

    async def get_supported_tasks(self):
        return ("generate",)

    # ------------------------------------------------- the rest of the interface
    # The serving layer asks these; a front door has no engine of its own.
    @property
    def is_running(self) -> bool:
        return True

    @property
    def is_stopped(self) -> bool:
        return False

    @property
    def errored(self) -> bool:
        return False

    @property
    def dead_error(self) -> BaseException:
        return RuntimeError("no engine here")

    def encode(self, *args, **kwargs):
        raise NotImplementedError("Shoal serves generation only")

    async def notify_kv_transfer_request_rejected(self, *args, **kwargs) -> None:
        return None

    async def is_tracing_enabled(self) -> bool:
        return False

    async def do_log_stats(self) -> None:
        return None

    async def check_health(self) -> None:
        return None

    async def start_profile(self, *args, **kwargs) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

    async def reset_mm_cache(self) -> None:
        return None

    async def reset_encoder_cache(self) -> None:
        return None

    async def reset_prefix_cache(self, *args, **kwargs) -> bool:
        return False

    async def sleep(self, *args, **kwargs) -> None:
        return None

    async def release_kv_cache_memory(self) -> None:
        return None

    async def wake_up(self, *args, **kwargs) -> bool:
        return False

    async def is_sleeping(self) -> bool:
        return False

    async def add_lora(self, lora_request) -> bool:
        return False

    async def pause_generation(self, *args, **kwargs) -> None:
        return None

    async def resume_generation(self) -> None:
        return None

    async def is_paused(self) -> bool:
        return False

    def shutdown(self, *args, **kwargs) -> None:
        return None


def _logprobs(rows):
    """The worker's logprob rows as vLLM's ``LogprobsLists``."""
    if not rows:
        return None
    import numpy as np
    from vllm.v1.outputs import LogprobsLists

    return LogprobsLists(np.array([r[0] for r in rows], dtype=np.int64),
                         np.array([r[1] for r in rows], dtype=np.float32),
                         np.array([r[2] for r in rows], dtype=np.int64))
