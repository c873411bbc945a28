"""The demo's Serve app builder: ``serve_apps.app.build_app`` after writing
the tiny test checkpoints the catalog names but lacks on disk (no model hub
needed). ``ray_configs/serve.yaml`` and ``shoal up --demo`` use it; a real
deployment points ``import_path`` at ``serve_apps.app:build_app``.
"""

from __future__ import annotations

from typing import Any

from cluster.catalog import load_catalog
from cluster.testing.tiny_models import ensure_tiny_models
from serve_apps.app import DEFAULT_CATALOG
from serve_apps.app import build_app as build_production_app


def build_app(args: dict[str, Any] | None = None):
    args = dict(args or {})
    args.pop("make_tiny_models", None)  # what this builder does anyway
    ensure_tiny_models(load_catalog(args.get("catalog", DEFAULT_CATALOG)))
    # The production builder reads the catalog again: sizes from the new files.
    return build_production_app(args)
