"""An engine shell: one vLLM ``AsyncLLM`` whose weights can be swapped in place.

Starting a vLLM engine costs tens of seconds (process spawn, model build, KV
allocation); replacing the weights of a running engine with another
checkpoint of the same shapes costs about one memcpy. A shell is the
reusable part (Aegaeon's "component reuse"): the engine lives on while the
model it serves changes.

On CPU a shell also keeps, inside its engine process, each model it has
served in vLLM's prepared (repacked) form, so that swapping back to it skips
vLLM's reload and repacking (``cluster/engine/cpu_weight_swap.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.catalog import ModelSpec
from cluster.engine.checkpoint import CheckpointInfo
from cluster.engine.cpu_weight_swap import EXTENSION_QUALNAME
from cluster.engine.platform import EngineCaps
from cluster.errors import CheckpointError, IncompatibleModelError

# A SIGKILLed engine worker leaves its vLLM engine-core processes behind;
# with this in the raylet's environment the raylet adopts (subreaper) and
# kills them (``shoal up``, the test cluster, ``shoal bench chaos``).
REAP_ENV = "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"

log = logging.getLogger(__name__)


def engine_died(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) says a vLLM engine is dead: its
    engine-core process was killed or crashed. Such an engine never serves
    again, unlike a request that failed."""
    from vllm.v1.engine.exceptions import EngineDeadError

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, EngineDeadError):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False

# EngineShell.last_swap_path values
RELOAD, PREPARED = "reload", "prepared"


@dataclass(frozen=True)
class _Prepared:
    """The shell's note of one model kept prepared in its engine process."""

    files: tuple  # identity of the weight files it was captured from
    summary: dict  # what the engine reported: bytes, tensor and kernel counts


def _weight_files_identity(weights_dir: str) -> tuple:
    """Name, size, mtime and inode of each weight file: cheap (stat only).

    A prepared copy is used only for the exact files it was captured from,
    so a model re-cached from another checkpoint under the same name (new
    files in tmpfs) never gets the old weights, even if ``forget`` was missed.
    """
    out = []
    for f in sorted(Path(weights_dir).glob("*.safetensors")):
        st = f.stat()
        out.append((f.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


class EngineShell:
    """One AsyncLLM plus which model's weights it holds right now."""

    def __init__(self, shell_id: str, engine: Any, info: CheckpointInfo, resident: str,
                 sleep_mode: bool):
        self.id = shell_id
        self.engine = engine
        self.swap_signature = info.swap_signature  # what may be swapped in
        self.resident: str | None = resident  # model whose weights are loaded
        self.sleep_mode = sleep_mode  # the platform has vLLM sleep mode (GPU, Ascend)
        self.sleeping = False
        self.slept_level: int | None = None  # the level it sleeps at (2: reload on wake)
        self.tokenizer = engine.get_tokenizer()
        # What this engine can do, as its worker says (``_probe``): nothing
        # until probed. Prepared swaps (CPU) need it; the reason is kept.
        self.caps = EngineCaps(sleep=False, reload_weights=False, prepared_swap=False)
        self.prepared_swaps = False
        self.prepared_swaps_off_reason = "not probed"
        self._prepared: dict[str, _Prepared] = {}
        self.last_swap_path: str | None = None  # RELOAD or PREPARED

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
            # Adds the prepared-weights RPCs to vLLM's worker (inert unless
            # used; the engine reports whether they are safe, see below).
            worker_extension_cls=EXTENSION_QUALNAME,
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
        shell = cls(shell_id, engine, info, spec.name, sleep_mode)
        await shell._probe(kwargs["worker_extension_cls"])
        return shell

    async def _probe(self, extension: str) -> None:
        """Ask the engine's worker what it can do: reload_weights, sleep and
        wake_up, a safe prepared swap (``cluster/engine/platform.py``)."""
        if extension != EXTENSION_QUALNAME:
            self.prepared_swaps_off_reason = f"engine_args set worker_extension_cls={extension!r}"
            probed = {"reload_weights": True, "sleep": True}  # cannot ask: vLLM's own worker
        else:
            try:
                probed = (await self.engine.collective_rpc("shoal_capabilities"))[0]
                self.prepared_swaps_off_reason = probed.get("prepared_swap_off_reason", "")
            except Exception as e:  # noqa: BLE001 - e.g. another vLLM version
                probed = {"reload_weights": True, "sleep": True}
                self.prepared_swaps_off_reason = f"probe failed: {type(e).__name__}: {e}"
        self.caps = EngineCaps.of(self.sleep_mode, probed)
        self.prepared_swaps = self.caps.prepared_swap and self.caps.reload_weights
        log.info("shell %s: park by %s, swap by %s%s", self.id, *self.caps.mechanisms(),
                 f" (prepared swaps off: {self.prepared_swaps_off_reason})"
                 if self.prepared_swaps_off_reason else "")

    @property
    def can_swap(self) -> bool:
        """Can another model's weights be put into this engine in place?"""
        return self.caps.reload_weights

    async def swap_in(self, name: str, weights_dir: str, *, use_prepared: bool = True) -> float:
        """Replace the resident weights with ``name``'s; returns seconds taken.

        The caller has checked the swap signature and that no request is in
        flight. Two paths; ``last_swap_path`` says which one ran:

        - PREPARED (CPU, when this shell already served ``name`` from these
          exact files): the engine copies the model's plain tensors into the
          live ones and re-points each linear layer at the model's packed
          kernel, kept from last time (``cluster/engine/cpu_weight_swap.py``).
        - RELOAD (first time, GPU, or ``use_prepared=False``): vLLM's
          ``reload_weights``. On CUDA that is close to a copy of the weights.
          On CPU vLLM keeps no plain linear weights: each is repacked into a
          oneDNN/SGL kernel handle, which dominates (``shoal bench swap``).
          With prepared swaps on, the result is then captured for next time.

        The prefix cache is reset on every swap: its blocks are keyed by
        token ids only, so without the reset the new model would reuse KV
        computed by the old one for the same prefix and answer wrongly.
        """
        if not self.can_swap:
            raise IncompatibleModelError(f"shell {self.id}: this platform's vLLM worker has no "
                                         f"reload_weights, so weights cannot be swapped in place")
        t0 = time.perf_counter()
        self.resident = None  # half-swapped weights belong to no model
        self.last_swap_path = None
        use_prepared = use_prepared and self.prepared_swaps
        files = _weight_files_identity(weights_dir) if use_prepared else ()
        held = self._prepared.get(name) if use_prepared else None
        if held is not None and held.files == files \
                and await self._apply_prepared(name, weights_dir):
            self.last_swap_path = PREPARED
        else:
            await self.engine.collective_rpc("reload_weights",
                                             kwargs={"weights_path": weights_dir})
            if use_prepared:
                await self._capture(name, files)
            self.last_swap_path = RELOAD
        await self.engine.reset_prefix_cache()
        self.resident = name
        return time.perf_counter() - t0

    async def _capture(self, name: str, files: tuple) -> None:
        """Keep the just-reloaded ``name`` prepared (engine idle, weights fresh)."""
        try:
            summary = (await self.engine.collective_rpc("shoal_capture", args=(name,)))[0]
        except Exception:  # noqa: BLE001 - the swap itself succeeded; only the copy is lost
            log.exception("shell %s: could not keep %r prepared; next swap reloads", self.id, name)
            return
        self._prepared[name] = _Prepared(files, summary)

    async def _apply_prepared(self, name: str, weights_dir: str) -> bool:
        """The PREPARED path; False (copy dropped) if it failed, so RELOAD runs."""
        try:
            await self.engine.collective_rpc("shoal_apply", args=(name, weights_dir))
            return True
        except Exception:  # noqa: BLE001 - vLLM wraps engine-side errors variously
            # The live model may be half-written; RELOAD rewrites all of it.
            log.exception("shell %s: prepared swap to %r failed; reloading", self.id, name)
            await self.forget(name)
            return False

    async def forget(self, name: str) -> bool:
        """Free the prepared copy of ``name`` kept in this shell's engine.

        Call it when ``name`` is unloaded (its host-RAM copy is otherwise kept
        until the shell shuts down). Safe for any name and any state: returns
        whether a copy was held. The live model is unaffected, even if
        ``name`` is the one being served.
        """
        if self._prepared.pop(name, None) is None:
            return False
        if self.engine is not None:
            await self.engine.collective_rpc("shoal_forget", args=(name,))
        return True

    def prepared_bytes(self) -> dict[str, int]:
        """Host-RAM bytes of each model's prepared copy in this shell's engine.

        Per model: cloned plain tensors plus its packed linear kernels (the
        kernels estimated at their unpacked size). For the model currently
        served the kernels are the live ones, so only its tensor clones are
        extra; for every other model the whole amount is extra RAM.
        """
        return {n: p.summary["bytes"] for n, p in self._prepared.items()}

    def prepared_summary(self, name: str) -> dict | None:
        """The engine's account of ``name``'s prepared copy: counts and bytes."""
        held = self._prepared.get(name)
        return dict(held.summary) if held is not None else None

    # --- vLLM sleep mode (CUDA, ROCm, Ascend: where the platform and the
    # engine's worker both have it). Written against vLLM's documented API
    # (AsyncLLM.sleep / wake_up); it cannot run on our CPU CI machines, where
    # the platform has no sleep mode and these are never called.
    async def sleep(self) -> None:
        """Level 1: weights to host RAM, KV discarded. Level 2: weights
        dropped too (they are in Shoal's host cache: ``wake`` reloads them)."""
        level = self.caps.sleep_level()
        await self.engine.sleep(level=level)
        self.sleeping, self.slept_level = True, level

    async def wake(self, weights_dir: str) -> None:
        await self.engine.wake_up()
        if self.slept_level == 2:
            # A level-2 wake without a reload serves garbage (vllm #29341).
            await self.engine.collective_rpc("reload_weights",
                                             kwargs={"weights_path": weights_dir})
        await self.engine.reset_prefix_cache()
        self.sleeping, self.slept_level = False, None

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
        self._prepared.clear()  # they live in the engine process, which ends here
        try:
            self.engine.shutdown()
        except Exception:  # already dead: nothing left to free
            log.exception("shell %s: engine shutdown failed", self.id)
        # Drop the engine now: vLLM's __del__ shuts down again and fails
        # noisily if it only runs at interpreter exit.
        self.engine = None
