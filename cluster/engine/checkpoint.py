"""Reading a checkpoint's identity before any engine touches it.

Two checkpoints can share one engine (in-place weight swap) only when every
tensor (name, shape, dtype) and the tokenizer are identical. ``swap_signature``
captures exactly that, so an incompatible swap fails with a clear error up
front instead of a shape mismatch deep inside vLLM. The catalog's load-time
checks (``cluster/engine/catalog_checks.py``) read checkpoints here too, so a
family whose members could not swap is refused before anything runs.
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
# A safetensors header is JSON of this size at most (the format's own limit
# is 100 MB); a bigger length prefix is a corrupt or foreign file.
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    swap_signature: str  # equal signatures => weights swap in place
    max_position_embeddings: int | None
    # Every architecture config.json names (vLLM tries them in order).
    architectures: tuple[str, ...] = ()


def read_config(path: str | Path) -> dict:
    """``config.json`` of the checkpoint at ``path``; names what is wrong."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist or is not a directory")
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(p)!r}: unreadable config.json: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"checkpoint {str(p)!r}: config.json is not a JSON object")
    return cfg


def tensor_layout(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint: name -> (dtype, shape), from the
    safetensors headers alone (no tensor data is read). Sharding does not
    change it."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {str(p)!r} has no *.safetensors weights")
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        try:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n <= _MAX_HEADER_BYTES:
                    raise ValueError(f"header length {n}")
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name != "__metadata__":
                    layout[name] = (str(meta["dtype"]), tuple(int(d) for d in meta["shape"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"checkpoint {str(p)!r}: unreadable {f.name}: {e}") from None
    return layout


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Validate that ``path`` is a loadable HF checkpoint; name what is wrong."""
    p = Path(path)
    cfg = read_config(p)
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"checkpoint {str(p)!r}: config.json names no 'architectures'")
    layout = tensor_layout(p)
    h = hashlib.sha256()
    h.update(json.dumps({k: cfg.get(k) for k in _SHAPE_KEYS}, sort_keys=True).encode())
    h.update(json.dumps(sorted(layout.items())).encode())
    tok = p / "tokenizer.json"
    if tok.exists():
        h.update(tok.read_bytes())
    return CheckpointInfo(p, archs[0], h.hexdigest()[:16], cfg.get("max_position_embeddings"),
                          tuple(archs))


def swap_difference(a: str | Path, b: str | Path) -> str | None:
    """What keeps checkpoint ``b`` from swapping into ``a``'s engine, in
    words (the first config key, tensor or tokenizer that differs), or None
    when their swap signatures are equal."""
    ca, cb = read_config(a), read_config(b)
    for k in _SHAPE_KEYS:
        if ca.get(k) != cb.get(k):
            return f"config.json {k}: {ca.get(k)!r} vs {cb.get(k)!r}"
    la, lb = tensor_layout(a), tensor_layout(b)
    for name in sorted(la.keys() | lb.keys()):
        if la.get(name) != lb.get(name):
            def show(t):
                return "absent" if t is None else f"{t[0]} {list(t[1])}"
            return f"tensor {name}: {show(la.get(name))} vs {show(lb.get(name))}"
    ta, tb = Path(a) / "tokenizer.json", Path(b) / "tokenizer.json"
    if (ta.read_bytes() if ta.exists() else None) != (tb.read_bytes() if tb.exists() else None):
        return "tokenizer.json differs"
    return None
