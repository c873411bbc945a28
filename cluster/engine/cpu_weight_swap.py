"""Fast same-architecture swaps on CPU: keep each model's *prepared* weights.

Why. vLLM's CPU backend does not run linear layers from their weight
Parameter: after loading, ``process_weights_after_loading`` hands every
linear weight to ``dispatch_cpu_unquantized_gemm``, which reorders it into a
oneDNN matmul handle (SGL or zentorch packs on other CPUs), stores a closure
over that handle as ``module.cpu_linear`` and empties ``module.weight``.
``reload_weights`` must therefore parse safetensors and re-run that
repacking on every swap, which costs many times a plain copy of the bytes
(``shoal bench swap`` reports it as ``reload_swap_over_memcpy_bound``).

What is kept. Right after vLLM has prepared a model (a ``reload_weights``
swap), ``capture`` records it in this process (the engine core):

- plain tensors, i.e. every parameter and buffer that holds data
  (embeddings, lm_head, norms, biases, rotary cache): cloned. A later swap
  ``copy_``s them into the live tensors, in place: a real memcpy, and the
  live tensor objects (what compiled graphs would hold) never change;
- packed linear kernels: a *reference* to each module's ``cpu_linear``
  closure, which keeps its packed handle alive. A later swap re-points
  ``module.cpu_linear`` at it. This is a reference swap, not a copy:
  oneDNN reorders the weight into memory it allocates itself and vLLM
  exposes no pointer or tensor view of it, so nothing can be copied *into*
  a live handle from Python. No bytes of these kernels move during a swap;
  the price is that a parked model's packed kernels stay allocated in the
  engine process's RAM (``kernel_bytes`` below) until ``forget``. (On AMX
  CPUs vLLM picks SGL kernels whose packed weight is a tensor held by the
  closure, which could be copied into; that path is untested here, and the
  reference swap is correct for all three kernel kinds, so one way is used.)

The recorded state is complete for the model-dependent state vLLM keeps for
an unquantized, eager, single-worker CPU model (checked by
``unsupported_reason``); anything else keeps using ``reload_weights``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: engine_shell imports this module
    import torch

# Qualified name handed to vLLM as ``worker_extension_cls``.
EXTENSION_QUALNAME = "cluster.engine.cpu_weight_swap.PreparedWeightsExtension"


@dataclass
class PreparedWeights:
    """One model as vLLM's CPU worker holds it after preparation."""

    tensors: dict[str, torch.Tensor]  # param/buffer name -> private clone
    kernels: dict[str, Callable]  # module name -> its cpu_linear closure
    tensor_bytes: int  # bytes of the clones (copied on every swap)
    kernel_bytes: int  # estimate: the weights' unpacked size (oneDNN may pad)

    def summary(self) -> dict:
        return {"tensors": len(self.tensors), "kernels": len(self.kernels),
                "tensor_bytes": self.tensor_bytes, "kernel_bytes": self.kernel_bytes,
                "bytes": self.tensor_bytes + self.kernel_bytes}


def _live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights appear once (named_* dedupe by identity). Empty tensors are
    # the emptied linear weights: nothing to copy. Module attributes that are
    # not parameters or buffers (e.g. Attention.kv_cache) are deliberately
    # not visited: the KV cache belongs to the engine, not the model.
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {n: t for n, t in named if t.numel() > 0}


def _unpacked_weight_bytes(module: torch.nn.Module) -> int:
    """Size of the weight a packed kernel was made from (its packed size, roughly)."""
    import torch
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    info = LAYERWISE_INFO.get(module)
    meta = info.restore_metadata[0].get("weight") if info is not None else None
    w = meta if meta is not None else getattr(module, "weight", None)
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else 0


def capture(model: torch.nn.Module) -> PreparedWeights:
    """Record the live, prepared model (call right after vLLM prepared it)."""
    tensors = {n: t.detach().clone() for n, t in _live_tensors(model).items()}
    mods = [(n, m) for n, m in model.named_modules() if hasattr(m, "cpu_linear")]
    return PreparedWeights(
        tensors=tensors,
        kernels={n: m.cpu_linear for n, m in mods},
        tensor_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        kernel_bytes=sum(_unpacked_weight_bytes(m) for _, m in mods),
    )


def apply(model: torch.nn.Module, prepared: PreparedWeights) -> int:
    """Make the live model ``prepared``'s model; returns bytes copied.

    Everything is checked before anything is written, so a mismatch leaves
    the live model untouched. A failure during the writes leaves it mixed;
    the caller then treats the engine as holding no model, and a later
    ``apply`` or ``reload_weights`` overwrites all of this state again.
    """
    live = _live_tensors(model)
    modules = dict(model.named_modules())
    if live.keys() != prepared.tensors.keys():
        raise ValueError(f"prepared tensors differ from the live model's: "
                         f"{sorted(live.keys() ^ prepared.tensors.keys())[:5]}")
    for n, t in live.items():
        src = prepared.tensors[n]
        if t.shape != src.shape or t.dtype != src.dtype:
            raise ValueError(f"{n}: live {tuple(t.shape)} {t.dtype}, "
                             f"prepared {tuple(src.shape)} {src.dtype}")
    kernel_owners = {n for n, m in modules.items() if hasattr(m, "cpu_linear")}
    if kernel_owners != prepared.kernels.keys():
        raise ValueError("prepared kernels do not match the live model's linear layers")
    import torch

    with torch.no_grad():  # some live parameters (RMSNorm weights) require grad
        for n, t in live.items():
            t.copy_(prepared.tensors[n])
    for n, fn in prepared.kernels.items():
        modules[n].cpu_linear = fn
    return prepared.tensor_bytes


def unsupported_reason(vllm_config, model: torch.nn.Module) -> str:
    """Why prepared swaps would be unsafe in this engine ("" if they are safe)."""
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        # On GPUs prepared weights are plain tensors and reload_weights is
        # already close to a copy; this path is untested there, so it stays off.
        return f"platform {current_platform.device_name!r} is not the CPU backend"
    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        # A compiled graph may hold the kernel closures as constants and
        # would silently keep the old model's kernels after a reference swap.
        return "the model is compiled (not enforce_eager)"
    if vllm_config.model_config.quantization is not None:
        return "quantized layers keep packed state this module does not record"
    if vllm_config.lora_config is not None:
        return "LoRA wraps layers this module does not record"
    if vllm_config.parallel_config.world_size != 1:
        return "only single-worker engines are covered"
    for n, m in model.named_modules():
        w = m._parameters.get("weight")
        # An emptied weight without a cpu_linear means the weight lives in
        # some packed form this module does not know how to record.
        if w is not None and w.numel() == 0 and not hasattr(m, "cpu_linear") \
                and _unpacked_weight_bytes(m) > 0:
            return f"{n} ({type(m).__name__}) keeps its weight in an unknown packed form"
    return ""


class PreparedWeightsExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``).

    Every method runs inside the engine-core process through
    ``collective_rpc``; results must be plain data. Names carry a ``shoal_``
    prefix because vLLM refuses an extension that shadows a worker attribute.
    """

    def _shoal_store(self) -> dict[str, PreparedWeights]:
        # Extensions get no __init__ call: create the store on first use.
        store = self.__dict__.get("_shoal_prepared")
        if store is None:
            store = self.__dict__["_shoal_prepared"] = {}
        return store

    def shoal_prepared_swap_unsupported(self) -> str:
        return unsupported_reason(self.vllm_config, self.model_runner.get_model())

    def shoal_capabilities(self) -> dict:
        """What this engine's worker class really has (cluster/engine/platform.py):
        out-of-tree platforms (vllm-ascend, vllm-gaudi) bring their own worker."""
        def has(obj, name: str) -> bool:
            return callable(getattr(obj, name, None))
        reason = self.shoal_prepared_swap_unsupported()
        return {"reload_weights": has(self, "reload_weights")
                and has(self.model_runner, "reload_weights"),
                "sleep": has(self, "sleep") and has(self, "wake_up"),
                "prepared_swap": not reason, "prepared_swap_off_reason": reason}

    def shoal_capture(self, name: str) -> dict:
        prepared = capture(self.model_runner.get_model())
        self._shoal_store()[name] = prepared  # replaces (and frees) an older copy
        return prepared.summary()

    def shoal_apply(self, name: str, weights_path: str) -> dict:
        prepared = self._shoal_store()[name]
        copied = apply(self.model_runner.get_model(), prepared)
        # What reload_weights(weights_path=...) records too: the config names
        # the checkpoint the engine now serves.
        model_config = self.vllm_config.model_config
        model_config.model, model_config.model_weights, model_config.revision = \
            weights_path, "", None
        return {**prepared.summary(), "copied_bytes": copied}

    def shoal_forget(self, name: str) -> bool:
        # Dropping the closures releases their oneDNN handles (their __del__).
        return self._shoal_store().pop(name, None) is not None
