"""An engine shell: one vLLM ``AsyncLLM`` whose weights can be swapped in place.

Starting a vLLM engine costs tens of seconds (process spawn, model build, KV
allocation); replacing the weights of a running engine with another
checkpoint of the same shapes costs about one memcpy. A shell is the
reusable part (Aegaeon's "component reuse"): the engine lives on while the
model it serves changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from cluster.catalog import ModelSpec
from cluster.checkpoint import CheckpointInfo
from cluster.errors import CheckpointError

log = logging.getLogger(__name__)


class EngineShell:
    """One AsyncLLM plus which model's weights it holds right now."""

    def __init__(self, shell_id: str, engine: Any, info: CheckpointInfo, resident: str,
                 sleep_mode: bool):
        self.id = shell_id
        self.engine = engine
        self.swap_signature = info.swap_signature  # what may be swapped in
        self.resident: str | None = resident  # model whose weights are loaded
        self.sleep_mode = sleep_mode  # vLLM sleep/wake available (GPU only)
        self.sleeping = False
        self.tokenizer = engine.get_tokenizer()

    @classmethod
    async def start(cls, shell_id: str, spec: ModelSpec, info: CheckpointInfo,
                    sleep_mode: bool, eager: bool) -> "EngineShell":
        """Build a fresh engine for ``spec`` (slow: tens of seconds)."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # The legacy env var would override our per-shell KV reservation.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        kwargs: dict[str, Any] = dict(
            model=spec.path,
            max_model_len=spec.max_model_len,
            kv_cache_memory_bytes=spec.kv_cache_bytes,
            enable_prefix_caching=True,
            enable_sleep_mode=sleep_mode,
            # On CPU, torch.compile roughly triples every engine start (seen
            # once with a scratch script, not a shoal bench); on GPU, CUDA
            # graphs pay for themselves, so only CPU goes eager.
            enforce_eager=eager,
            disable_log_stats=True,
            seed=0,
        )
        kwargs.update(spec.engine_args)
        try:
            args = AsyncEngineArgs(**kwargs)
            # Engine construction blocks for the whole startup; run it off the
            # actor's event loop so other models keep streaming meanwhile.
            engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except TypeError as e:
            raise CheckpointError(f"model {spec.name!r}: bad engine_args: {e}") from None
        except Exception as e:  # vLLM raises many types for bad checkpoints
            raise CheckpointError(
                f"model {spec.name!r}: vLLM could not start an engine for "
                f"{spec.path!r} ({info.architecture}): {type(e).__name__}: {e}"
            ) from None
        return cls(shell_id, engine, info, spec.name, sleep_mode)

    async def swap_in(self, name: str, weights_dir: str) -> float:
        """Replace the resident weights with ``name``'s; returns seconds taken.

        The caller has checked the swap signature and that no request is in
        flight. Cost: on CUDA this is close to a copy of the weights. On CPU,
        vLLM keeps no plain weight tensors: every linear layer's weight is
        repacked into a oneDNN/SGL kernel handle and the parameter emptied,
        so ``reload_weights`` must re-run that repacking, which dominates
        (``shoal bench swap``: 0.085 s for 103 MB vs a 5.4 ms memcpy bound).

        The prefix cache is reset on every swap: its blocks are keyed by
        token ids only, so without the reset the new model would reuse KV
        computed by the old one for the same prefix and answer wrongly.
        """
        t0 = time.perf_counter()
        self.resident = None  # half-swapped weights belong to no model
        await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": weights_dir})
        await self.engine.reset_prefix_cache()
        self.resident = name
        return time.perf_counter() - t0

    # --- GPU-only: vLLM sleep mode. Written against vLLM's documented API
    # (AsyncLLM.sleep / wake_up); it cannot run on our CPU CI machines, where
    # sleep_mode is False and these are never called.
    async def sleep(self) -> None:
        await self.engine.sleep(level=1)  # weights to host RAM, KV discarded
        self.sleeping = True

    async def wake(self) -> None:
        await self.engine.wake_up()
        await self.engine.reset_prefix_cache()
        self.sleeping = False

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    async def generate(self, prompt_token_ids: list[int], sampling: Any,
                       request_id: str) -> AsyncIterator[Any]:
        from vllm.inputs import TokensPrompt

        async for out in self.engine.generate(
                TokensPrompt(prompt_token_ids=prompt_token_ids), sampling, request_id):
            yield out

    async def abort(self, request_id: str) -> None:
        if self.engine is not None:  # a shut-down engine has nothing to abort
            await self.engine.abort(request_id)

    def shutdown(self) -> None:
        self.resident = None
        try:
            self.engine.shutdown()
        except Exception:  # already dead: nothing left to free
            log.exception("shell %s: engine shutdown failed", self.id)
        # Drop the engine now: vLLM's __del__ shuts down again and fails
        # noisily if it only runs at interpreter exit.
        self.engine = None
