"""The tiny local checkpoints: complete, deterministic, correctly grouped."""

from __future__ import annotations

import hashlib
import json

import pytest

from cluster.engine.checkpoint import read_checkpoint
from cluster.ops.cli import main as shoal
from cluster.errors import CheckpointError


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_checkpoints_are_complete_hf_directories(tiny_models):
    for path in tiny_models.values():
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (path / f).exists(), f"{path.name} lacks {f}"
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = tok_cfg.get("chat_template") or (path / "chat_template.jinja").read_text()
        assert "<|im_start|>" in template
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64  # CPU kernel needs >= 32


def test_same_family_swappable_other_architecture_not(tiny_models):
    sig = {n: read_checkpoint(p).swap_signature for n, p in tiny_models.items()}
    assert sig["tiny-llama-a"] == sig["tiny-llama-b"] == sig["tiny-llama-c"]
    assert sig["tiny-qwen"] != sig["tiny-llama-a"]
    assert _digest(tiny_models["tiny-llama-a"]) != _digest(tiny_models["tiny-llama-b"])


def test_generation_is_deterministic(tiny_models, tmp_path, capsys):
    assert shoal(["make-test-models", str(tmp_path), "--only", "tiny-llama-b"]) == 0
    assert "tiny-llama-b" in capsys.readouterr().out
    again = tmp_path / "tiny-llama-b"
    assert _digest(again) == _digest(tiny_models["tiny-llama-b"])
    assert (again / "tokenizer.json").read_bytes() == \
        (tiny_models["tiny-llama-b"] / "tokenizer.json").read_bytes()


def test_unknown_model_name_and_bad_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model"):
        shoal(["make-test-models", str(tmp_path), "--only", "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_checkpoint(tmp_path / "empty")


def test_the_demo_writes_missing_checkpoints_and_production_never_does(tmp_path):
    """``ensure_tiny_models`` (the demo app builder's step) writes the tiny
    checkpoints a catalog names but lacks; the production app builder
    refuses the demo option instead of writing test checkpoints."""
    from cluster.catalog import CatalogError, load_catalog
    from cluster.testing.tiny_models import ensure_tiny_models
    from serve_apps.app import load_app_catalog

    catalog = load_catalog({"models": [
        {"name": "x", "path": str(tmp_path / "tiny-llama-a"), "family": "f"},
        {"name": "y", "path": str(tmp_path / "not-a-tiny-name"), "family": "f"}]})
    ensure_tiny_models(catalog)
    assert (tmp_path / "tiny-llama-a" / "config.json").exists()
    assert not (tmp_path / "not-a-tiny-name").exists()  # only names it knows
    with pytest.raises(CatalogError, match="demo app builder cluster.ops.demo_app"):
        load_app_catalog({"make_tiny_models": True})
