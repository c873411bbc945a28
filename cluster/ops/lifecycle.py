"""``shoal up`` / ``shoal down`` / ``shoal status``.

``up`` joins the cluster in ``RAY_ADDRESS`` or, if unset, starts a local
head node (``ray start --head``) that outlives the command; then it deploys
the Serve app (controller and front door) and returns once ``/health``
answers. What ``up`` started is written to ``.shoal/up.json`` so ``down``
stops exactly that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cluster.engine.shell import REAP_ENV

STATE_FILE = Path(".shoal/up.json")
APP_NAME = "shoal"


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _connect(address: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace="shoal", log_to_driver=False)


def up(config: str, port: int, demo: bool, host: str = "127.0.0.1",
       timeout_s: float = 600) -> str:
    from ray import serve

    if demo:
        from cluster.ops.demo_app import build_app
    else:
        from serve_apps.app import build_app

    started_ray = False
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        subprocess.run([_ray_bin(), "start", "--head", "--disable-usage-stats",
                        "--include-dashboard=false"], check=True, capture_output=True,
                       env={**os.environ, REAP_ENV: os.environ.get(REAP_ENV, "true")})
        address, started_ray = "auto", True
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps({"started_ray": started_ray, "port": port}))
    _connect(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app({"catalog": config}),
              name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    _wait_healthy(url, timeout_s)
    return url


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f} s: {last}")


def down() -> None:
    import ray

    state = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {}
    address = os.environ.get("RAY_ADDRESS") or "auto"
    try:
        _connect(address)
    except Exception as e:  # nothing running
        print(f"no Ray cluster to stop ({e})")
    else:
        from serve_apps.app import shutdown_app

        shutdown_app()
        ray.shutdown()
    if state.get("started_ray"):
        subprocess.run([_ray_bin(), "stop", "--force"], check=False, capture_output=True)
    STATE_FILE.unlink(missing_ok=True)


def status() -> dict:
    """The controller's ``status()`` (what ``/admin/status`` shows)."""
    import ray

    from cluster.control.controller import get_controller

    _connect(os.environ.get("RAY_ADDRESS") or "auto")
    return ray.get(get_controller().status.remote())
