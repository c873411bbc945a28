"""A FAKE multi-node Ray cluster on one machine with Ray's real autoscaler:
elasticity without a cloud, for ``tests/test_elastic_ray.py`` and
``shoal bench elastic``.

Ray's ``fake_multinode`` provider runs the real autoscaler (v2 here) in the
head's monitor process; "launching a node" starts another raylet on this
machine with the node type's resources and labels (``GPU``,
``accelerator_type:*``, ``shoal.io/accelerator-type``), and terminating one
kills it. Shoal discovers those devices as on a real cluster; with
``discovery.emulate_accelerators_on_cpu`` their engines run vLLM on CPU.

The cluster is its own: its own GCS port and temp dir, every port chosen
free, so it never meets another cluster on the machine; ``stop`` kills
exactly its processes (those naming its temp dir or GCS address, and their
descendants), never ``ray stop``. ``ray.cluster_utils.AutoscalingCluster``
is not used: the 2.60 wheel lacks the example.yaml it reads, and it runs
``ray stop --force``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO_CONFIG = Path(__file__).resolve().parents[2] / "ray_configs" / "autoscale-fake.yaml"
# What the v2 autoscaler's fake provider calls the head node (Ray's constant).
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
REAP_ENV = "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


class FakeAutoscalingCluster:
    """``start()`` a head with an autoscaling config; ``stop()`` everything it started."""

    def __init__(self, config: str | Path = REPO_CONFIG, num_cpus: int = 2,
                 overrides: dict | None = None):
        self.config = yaml.safe_load(Path(config).read_text())
        self.config.update(overrides or {})
        self.num_cpus = num_cpus
        # Short on purpose: Ray's Unix sockets live under it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="shoal-fa-", dir="/tmp")
        self.port = free_port()
        self.address = f"{node_ip()}:{self.port}"
        self.env = self._env()

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({
            "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_enable_autoscaler_v2": "1", "RAY_AUTH_MODE": "disabled",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            REAP_ENV: "true", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            # On a loaded machine a raylet's agents can take over a minute to
            # come up; Ray's defaults then abort the node ("Timed out
            # waiting for file ...dashboard_agent_listen_port...").
            "RAY_agent_register_timeout_ms": "300000", "RAY_raylet_start_wait_time_s": "300",
            # Every worker process, on every fake node, imports Shoal from here.
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_CONFIG.parents[1]), os.environ.get("PYTHONPATH")) if p)})
        return env

    def start(self) -> "FakeAutoscalingCluster":
        cfg = self.config
        cfg["provider"]["gcs_address"] = self.address  # fake nodes join this GCS
        path = Path(self.temp_dir) / "autoscaling.yaml"
        path.write_text(yaml.safe_dump(cfg))
        ports = [f"--{name}={free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port", "node-manager-port", "object-manager-port",
            "ray-client-server-port")]
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head",
               f"--port={self.port}", f"--temp-dir={self.temp_dir}", *ports,
               f"--autoscaling-config={path}", f"--num-cpus={self.num_cpus}",
               "--include-dashboard=false", "--disable-usage-stats"]
        try:
            out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=400)
        except BaseException:
            self.stop()  # whatever it started
            raise
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        return self

    def nodes(self) -> list[dict]:
        """Alive nodes, from the state API (no driver connection needed)."""
        from ray.util.state import list_nodes

        return [n.__dict__ for n in list_nodes(address=self.address, raise_on_missing_output=False)
                if n.state == "ALIVE"]

    def stop(self) -> None:
        """Kill this cluster's processes and their descendants, then its temp dir."""
        kill_tree(self.temp_dir, f":{self.port}")
        time.sleep(0.5)
        subprocess.run(["rm", "-rf", self.temp_dir], check=False)


def kill_tree(*marks: str) -> None:
    """Kill the processes whose command line names one of ``marks`` (a
    cluster's temp dir: its GCS, raylets, agents) and all their descendants
    (workers rename themselves ``ray::...``, and vLLM engine processes hang
    below them). Never ``ray stop``: that would stop every cluster here."""
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True,
                           text=True).stdout.splitlines()
    rows = [(int(p), int(pp), args) for p, pp, args in (r.split(None, 2) for r in table
                                                        if len(r.split(None, 2)) == 3)]
    doomed = {p for p, _, args in rows if any(m in args for m in marks) and p != os.getpid()}
    grew = True
    while grew:
        more = {p for p, pp, _ in rows if pp in doomed} - doomed
        doomed |= more
        grew = bool(more)
    for p in doomed:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass
