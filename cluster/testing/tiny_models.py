"""Deterministic tiny Hugging Face checkpoints, built locally (no model hub).

Tests, the demo and the benchmarks all use these. Every checkpoint is a full
HF directory: ``config.json``, ``model.safetensors``, a byte-level BPE
``tokenizer.json`` trained with `tokenizers` on text shipped in this package,
and a chat template in ``tokenizer_config.json``.

The set (see ``TINY_MODELS``):
- ``tiny-llama-{a..h}``: one Llama architecture, eight seeds. Same shapes and
  tokenizer, so any of them can be swapped into another's engine in place.
- ``tiny-qwen``: a different architecture (Qwen2), which must never be
  swapped into a Llama engine.
- ``swap-llama-{a,b}``: a ~100 MB same-architecture pair for the swap bench.

Why these shapes: vLLM's CPU attention kernel rejects head_dim 16, so every
model uses head_dim 64 (hidden = 64 x heads).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from cluster.catalog import Catalog

# The tokenizer is shared by every model so same-family checkpoints are
# interchangeable; its vocabulary is small and fixed by the corpus.
TOKENIZER_VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyModel:
    """One checkpoint to generate."""

    name: str  # directory name and catalog name
    family: str  # swap group: same family => same shapes and tokenizer
    architecture: str  # HF architecture class name
    seed: int  # the only difference between same-family variants
    hidden_size: int = 128
    num_layers: int = 2
    intermediate_size: int = 256
    extra_config: dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.hidden_size // 64  # head_dim 64, see module docstring


TINY_MODELS: tuple[TinyModel, ...] = (
    TinyModel("tiny-llama-a", "tiny-llama", "LlamaForCausalLM", seed=1),
    TinyModel("tiny-llama-b", "tiny-llama", "LlamaForCausalLM", seed=2),
    TinyModel("tiny-llama-c", "tiny-llama", "LlamaForCausalLM", seed=3),
    TinyModel("tiny-qwen", "tiny-qwen", "Qwen2ForCausalLM", seed=4),
    # Five more seeds of the tiny Llama: eight models time-share one device
    # in ``shoal bench timeshare``.
    *(TinyModel(f"tiny-llama-{x}", "tiny-llama", "LlamaForCausalLM", seed=seed)
      for seed, x in enumerate("defgh", start=5)),
    # ~100 MB of bf16 weights each: 15 layers of hidden 512.
    TinyModel("swap-llama-a", "swap-llama", "LlamaForCausalLM", seed=11,
              hidden_size=512, num_layers=15, intermediate_size=1536),
    TinyModel("swap-llama-b", "swap-llama", "LlamaForCausalLM", seed=12,
              hidden_size=512, num_layers=15, intermediate_size=1536),
)


def corpus_text() -> str:
    """The built-in tokenizer training text (shipped with the package)."""
    return resources.files("cluster.testing").joinpath("tiny_corpus.txt").read_text("utf-8")


def build_tokenizer():
    """Train the shared byte-level BPE tokenizer; deterministic for the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    return tok


def _hf_config(m: TinyModel, vocab_size: int):
    """The transformers PretrainedConfig for one tiny model."""
    from transformers import AutoConfig

    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[m.architecture]
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
        architectures=[m.architecture],
        **m.extra_config,
    )
    return cfg


def write_model(m: TinyModel, out_dir: Path, tokenizer) -> Path:
    """Write one checkpoint; identical bytes for identical inputs."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = out_dir / m.name
    path.mkdir(parents=True, exist_ok=True)
    cfg = _hf_config(m, tokenizer.get_vocab_size())
    torch.manual_seed(m.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    # HF's default init (std 0.02) gives nearly flat logits; a larger spread
    # makes greedy decoding decisive, so output comparisons across engines
    # are not decided by rounding ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(path)
    (path / "shoal_tiny.json").write_text(json.dumps(
        {"family": m.family, "seed": m.seed, "architecture": m.architecture}))
    return path


def make_test_models(out_dir: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Generate the tiny models (all, or just ``names``) under ``out_dir``.

    Models already present (same marker file) are kept, so fixtures and demos
    can call this freely.
    """
    out = Path(out_dir)
    wanted = [m for m in TINY_MODELS if names is None or m.name in names]
    unknown = set(names or []) - {m.name for m in TINY_MODELS}
    if unknown:
        raise ValueError(f"unknown tiny model(s) {sorted(unknown)}; "
                         f"choose from {[m.name for m in TINY_MODELS]}")
    todo = [m for m in wanted if not (out / m.name / "shoal_tiny.json").exists()]
    paths = {m.name: out / m.name for m in wanted}
    if todo:
        tokenizer = build_tokenizer()
        for m in todo:
            write_model(m, out, tokenizer)
    return paths


def ensure_tiny_models(catalog: Catalog) -> None:
    """Write the tiny checkpoints that catalog entries name but lack on disk."""
    tiny = {t.name for t in TINY_MODELS}
    missing: dict[Path, list[str]] = {}
    for m in catalog.models:
        p = Path(m.path)
        if not (p / "config.json").exists() and p.name in tiny:
            missing.setdefault(p.parent, []).append(p.name)
    for parent, names in missing.items():
        make_test_models(parent, names)


def write_variant(base: str, out_dir: str | Path, name: str, **changes) -> Path:
    """A checkpoint like the tiny model ``base`` with some fields changed
    (``hidden_size=256``, ...): a same-family member that cannot swap."""
    m = replace(next(t for t in TINY_MODELS if t.name == base), name=name, **changes)
    return write_model(m, Path(out_dir), build_tokenizer())


def cast_checkpoint(src: str | Path, dst: str | Path, dtype: str) -> Path:
    """A copy of checkpoint ``src`` whose safetensors hold every tensor as
    ``dtype`` ("float32", ...), config.json untouched."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    for f in dst.glob("*.safetensors"):
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    return dst
