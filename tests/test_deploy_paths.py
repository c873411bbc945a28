"""The operator paths: ``ray job submit --working-dir .`` against a local
``ray start --head``, running ``serve run`` on the shipped
``ray_configs/serve.yaml``; then the official ``openai`` client talks to it.

This is a cluster of its own (separate temp dir and ports), so it is torn
down by killing exactly its processes, never with a bare ``ray stop``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import openai
import pytest

from cluster.ops.lifecycle import REAP_ENV
from cluster.testing.fake_autoscaler import kill_tree
from tests.conftest import free_port
from tests.helpers import wait_until

pytestmark = [pytest.mark.engine, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head():
    # Short on purpose: Ray's Unix sockets live under it (108-byte limit).
    temp = tempfile.mkdtemp(prefix="shoal-rh-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway local cluster: no token to hand around
    env["PATH"] = f"{BIN}:{env['PATH']}"  # the cluster's environment: `serve` on the PATH
    env[REAP_ENV] = "true"
    dash = free_port()
    # Every port its own, so it never meets the test session's cluster.
    ports = {f"--{name}={free_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
        "object-manager-port", "ray-client-server-port")}
    subprocess.run([BIN / "ray", "start", "--head", f"--temp-dir={temp}", *sorted(ports),
                    "--include-dashboard=true", f"--dashboard-port={dash}", "--num-cpus=2",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True)
    gcs = next(p for p in ports if p.startswith("--port=")).split("=")[1]
    yield {"dashboard": f"http://127.0.0.1:{dash}", "env": env}
    # `shoal down` first: engines shut down cleanly, then nothing is left to kill.
    subprocess.run([BIN / "shoal", "down"], cwd=ROOT, capture_output=True, timeout=300,
                   env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"})
    kill_tree(temp)
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_serve_run_shipped_yaml(head):
    def submit():
        job = subprocess.run(
            [BIN / "ray", "job", "submit", "--address", head["dashboard"], "--working-dir", ".",
             "--", "serve", "run", "--non-blocking", "ray_configs/serve.yaml"],
            cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=600)
        # A fresh head's job agent takes a few seconds to come up.
        return None if "No available agent" in job.stderr else job
    job = wait_until(submit, timeout_s=120, every_s=2)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused",
                           max_retries=0, timeout=300)

    def listed():
        try:
            return {m.id for m in client.models.list().data}
        except (openai.APIConnectionError, openai.NotFoundError):  # still deploying
            return None
    assert wait_until(listed, timeout_s=300, every_s=1) == {
        "tiny-llama-a", "tiny-llama-b", "tiny-llama-c", "tiny-qwen"}
    out = client.completions.create(model="tiny-llama-a", prompt="The tide", max_tokens=5,
                                    temperature=0)
    assert out.usage.completion_tokens == 5 and out.model == "tiny-llama-a"
