"""The Serve application builder: ``serve run``, ``serve deploy`` and
``shoal up`` all build the app here, from a catalog path (or dict).

App arguments (``args:`` in ``ray_configs/serve.yaml``):

- ``catalog``: path of the model catalog (default ``ray_configs/models.yaml``);
- ``make_tiny_models``: generate the tiny test checkpoints a catalog entry
  points at when its path is missing (demos and CI; no model hub needed);
- ``admin_key``: bearer key for ``/admin/*`` (or env ``SHOAL_ADMIN_KEY``);
- ``rate_limit_rps``: request rate limit for every model (off by default);
  ``rate_limits``: ``{model: requests/s}`` for some models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.catalog import Catalog, load_catalog

DEFAULT_CATALOG = "ray_configs/models.yaml"


def ensure_tiny_models(catalog: Catalog) -> None:
    """Write the tiny checkpoints that catalog entries name but lack on disk."""
    from cluster.tiny_models import TINY_MODELS, make_test_models

    tiny = {t.name for t in TINY_MODELS}
    missing: dict[Path, list[str]] = {}
    for m in catalog.models:
        p = Path(m.path)
        if not (p / "config.json").exists() and p.name in tiny:
            missing.setdefault(p.parent, []).append(p.name)
    for parent, names in missing.items():
        make_test_models(parent, names)


def load_app_catalog(args: dict[str, Any]) -> Catalog:
    source = args.get("catalog", DEFAULT_CATALOG)
    if isinstance(source, dict):
        return load_catalog(source)
    catalog = load_catalog(source)
    if args.get("make_tiny_models"):
        ensure_tiny_models(catalog)
        catalog = load_catalog(source)  # sizes are read from the new files
    return catalog


def build_app(args: dict[str, Any] | None = None):
    from serve_apps.ingress import ShoalIngress

    args = dict(args or {})
    catalog = load_app_catalog(args)
    return ShoalIngress.bind(catalog.model_dump(mode="json"), args.get("admin_key"),
                             args.get("rate_limit_rps"), args.get("rate_limits"))
