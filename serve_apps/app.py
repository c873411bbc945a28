"""The Serve application builder: ``serve run``, ``serve deploy`` and
``shoal up`` all build the app here, from a catalog path (or dict). The
demo (tiny generated checkpoints, no model hub) wraps it:
``cluster/ops/demo_app.py``.

App arguments (``args:`` in ``ray_configs/serve.yaml``):

- ``catalog``: path of the model catalog (default ``ray_configs/models.yaml``);
- ``admin_key``: bearer key for ``/admin/*`` (or env ``SHOAL_ADMIN_KEY``);
- ``rate_limit_rps``: request rate limit for every model (off by default);
  ``rate_limits``: ``{model: requests/s}`` for some models.

Tenants (API keys, their models and limits) are configured in the catalog's
``tenants`` section, not here (``serve_apps/tenants.py``).
"""

from __future__ import annotations

from typing import Any

from cluster.catalog import Catalog, CatalogError, load_catalog
from cluster.engine.catalog_checks import check_catalog

DEFAULT_CATALOG = "ray_configs/models.yaml"


def load_app_catalog(args: dict[str, Any]) -> Catalog:
    """The app's catalog, schema and checkpoints checked (once, here: the
    replicas and the controller get it checked)."""
    if "make_tiny_models" in args:
        raise CatalogError("make_tiny_models is a demo option: use the demo app builder "
                           "cluster.ops.demo_app:build_app (ray_configs/serve.yaml)")
    source = args.get("catalog", DEFAULT_CATALOG)
    where = "<dict>" if isinstance(source, dict) else str(source)
    return check_catalog(load_catalog(source), where)


def build_app(args: dict[str, Any] | None = None):
    from serve_apps.ingress import ShoalIngress

    args = dict(args or {})
    catalog = load_app_catalog(args)
    return ShoalIngress.bind(catalog.model_dump(mode="json"), args.get("admin_key"),
                             args.get("rate_limit_rps"), args.get("rate_limits"))


def shutdown_app() -> None:
    """Stop every engine worker, the controller, then Serve (``shoal down``,
    benchmarks). Needs this process connected to the cluster."""
    import ray
    from ray import serve

    from cluster.control.controller import get_controller

    try:
        c = get_controller()
        ray.get(c.shutdown_cluster.remote(), timeout=120)
        ray.kill(c, no_restart=True)
    except ValueError:
        pass  # no controller
    serve.shutdown()
