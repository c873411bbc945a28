"""Reading a checkpoint's identity before any engine touches it.

Two checkpoints can share one engine (in-place weight swap) only when every
tensor shape and the tokenizer are identical. ``swap_signature`` captures
exactly that, so an incompatible swap fails with a clear error up front
instead of a shape mismatch deep inside vLLM.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import CheckpointError

# config.json keys that fix tensor shapes; any difference forbids a swap.
_SHAPE_KEYS = (
    "model_type", "architectures", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias",
)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    swap_signature: str  # equal signatures => weights swap in place
    max_position_embeddings: int | None


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Validate that ``path`` is a loadable HF checkpoint; name what is wrong."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist or is not a directory")
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(p)!r}: unreadable config.json: {e}") from None
    archs = cfg.get("architectures") or []
    if not archs:
        raise CheckpointError(f"checkpoint {str(p)!r}: config.json names no 'architectures'")
    if not any(p.glob("*.safetensors")):
        raise CheckpointError(f"checkpoint {str(p)!r} has no *.safetensors weights")
    h = hashlib.sha256()
    h.update(json.dumps({k: cfg.get(k) for k in _SHAPE_KEYS}, sort_keys=True).encode())
    tok = p / "tokenizer.json"
    if tok.exists():
        h.update(tok.read_bytes())
    return CheckpointInfo(p, archs[0], h.hexdigest()[:16], cfg.get("max_position_embeddings"))
