"""``shoal bench chaos``: faults while OpenAI requests are in flight, on a
real local multi-node Ray cluster.

The cluster: a head node (Serve, the controller) and two worker nodes that
declare an accelerator each (engines run vLLM on CPU:
``discovery.emulate_accelerators_on_cpu``), as the test suite builds it.
``tiny-llama-a`` has a copy on each worker node, so a request caught by a
fault can resume on the other one; ``tiny-qwen`` stays cold (a catalog
model with no copy, which must still be listed after every fault).

First an undisturbed greedy run gives the reference text. Then for each
fault kind (``faults.FAULTS``, in that order): ``STREAMS`` streamed and
``BODIES`` non-streaming copies of that request are sent; once the copy
with the most of them running is known, the fault hits it
(``faults.INJECT``); every request is waited for (each has a hard
timeout), then a short request is polled until it succeeds: ``recovery_s``
is from the fault to that success. Each entry (``outcomes.chaos_entry``)
says how the requests in flight ended, whether the complete ones equal the
reference, whether the controller still lists every catalog model with a
copy of the served one, and how many vLLM engine-core processes were left
with no Ray worker for a parent. Between faults the lost copy is loaded
again (``restore_s``), so each fault starts from two copies.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from cluster.bench import faults
from cluster.bench.client import make_client, send
from cluster.bench.outcomes import Ending, chaos_entry
from cluster.bench.timeshare import KV_BYTES, STILL_POLICY
from cluster.catalog import ModelSpec
from cluster.engine.shell import REAP_ENV
from cluster.testing.tiny_models import make_test_models

MODEL, COLD = "tiny-llama-a", "tiny-qwen"
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
MAX_TOKENS = 1500  # long enough to be mid-stream when the fault hits
STREAMS, BODIES = 2, 2
END_BOUND_S = 120.0  # every request in flight ends within this (its timeout)
RECOVERY_BOUND_S = 150.0  # polling a new request gives up after this
ORPHAN_GRACE_S = 10.0  # the raylet's reaping gets this long
ACCELS = {"A100": {"shoal-node-a100": 1}, "L4": {"shoal-node-l4": 1}}


def _catalog(models_dir: str) -> dict:
    paths = make_test_models(models_dir, [MODEL, COLD])
    models = [{"name": m, "path": str(Path(paths[m]).resolve()),
               "family": "tiny-qwen" if m == COLD else "tiny-llama", "max_model_len": 2048,
               "kv_cache_bytes": KV_BYTES, "allowed_vendors": ["nvidia"],
               # Two copies kept by the policy (the first run loaded two by
               # admin and found one at the start: min_replicas 0 let it go).
               "min_replicas": 2 if m == MODEL else 0, "max_replicas": 2}
              for m in (MODEL, COLD)]
    footprint = ModelSpec(**models[0]).resolved().weights_bytes + KV_BYTES
    accel = {"memory_bytes": footprint + 8 * 2**20, "speed": 1.0}
    return {"models": models,
            "discovery": {"emulate_accelerators_on_cpu": True,
                          "accelerators": {a: accel for a in ACCELS}},
            "controller": {"tick_s": 2, "health_check_s": 1.0, "policy_config": STILL_POLICY}}


class Bench:
    def __init__(self, cluster, url: str, catalog: dict, baseline_cores: set[int]):
        self.cluster, self.url, self.catalog = cluster, url, catalog
        self.baseline_cores = baseline_cores
        self.client = make_client(url)

    async def status(self) -> dict:
        from cluster.control.controller import get_controller

        return await asyncio.wait_for(get_controller().status.remote(), 30)

    async def copies(self) -> dict[str, str]:
        by_name = {m["name"]: m for m in (await self.status())["models"]}
        return by_name[MODEL]["devices"]

    async def devices(self) -> list[dict]:
        return [d for d in (await self.status())["devices"] if d["accelerator_type"]]

    def node_of(self, node_id: str):
        for n in self.cluster.worker_nodes:
            if n.node_id == node_id:
                return n
        raise RuntimeError(f"no worker node {node_id}")

    async def ensure_two_copies(self, want_devices: int = 1) -> float:
        """Load the model on every alive accelerator device lacking it, once
        at least ``want_devices`` are alive (their workers report stats)."""
        from cluster.control.controller import get_controller

        t = time.monotonic()
        while sum(d["alive"] for d in await self.devices()) < want_devices:
            if time.monotonic() - t > 120:
                raise RuntimeError(f"fewer than {want_devices} devices alive after 120 s")
            await asyncio.sleep(1.0)
        for d in await self.devices():
            if d["alive"] and MODEL not in d["models"]:
                await asyncio.wait_for(get_controller().load.remote(MODEL, d["id"]), 300)
        return time.monotonic() - t

    async def busiest(self) -> str:
        """The device whose copy runs the most of the model's requests now."""
        import ray

        from cluster.control.fleet import NAMESPACE, worker_actor_name

        best, most = None, -1
        for dev in await self.copies():
            w = ray.get_actor(worker_actor_name(dev), namespace=NAMESPACE)
            s = await asyncio.wait_for(w.stats.remote(), 30)
            n = s.models[MODEL].running if MODEL in s.models else 0
            if n > most:
                best, most = dev, n
        return best

    def request(self, streaming: bool, i: int):
        return send(self.client, MODEL, PROMPT, MAX_TOKENS, streaming, END_BOUND_S,
                    request_id=f"chaos-{i}-{int(streaming)}")

    async def recover(self, since: float) -> float | None:
        """Seconds from ``since`` until a new short request succeeds."""
        while time.monotonic() - since < RECOVERY_BOUND_S:
            o = await send(self.client, MODEL, PROMPT, 8, False, 20.0)
            if o.ending is Ending.OK:
                return time.monotonic() - since
            await asyncio.sleep(0.5)
        return None

    async def models_kept(self) -> bool:
        try:
            st = await self.status()
        except Exception:  # noqa: BLE001 - an unreachable controller keeps nothing
            return False
        listed = {m["name"] for m in st["models"]}
        served = {m["name"]: m for m in st["models"]}[MODEL]["devices"]
        return listed == {m["name"] for m in self.catalog["models"]} and bool(served)

    async def one_fault(self, kind: str, reference: str) -> dict:
        tasks = [asyncio.create_task(self.request(s, i))
                 for i, s in enumerate([True] * STREAMS + [False] * BODIES)]
        await asyncio.sleep(2.0)  # prefilled and decoding
        device = await self.busiest()
        target = faults.Target(self.cluster, device,
                               self.node_of(next(d["node"] for d in await self.devices()
                                                 if d["id"] == device)))
        hit_at = time.monotonic()
        what = await asyncio.to_thread(faults.INJECT[kind], target)
        print(f"[chaos] {kind}: {what}", file=sys.stderr)
        outcomes = await asyncio.gather(*tasks)
        recovery = await self.recover(hit_at)
        await asyncio.sleep(ORPHAN_GRACE_S)
        orphans = faults.orphaned_engine_cores(self.baseline_cores)
        entry = {"kind": kind, "status": "run", "injected": what, "device": device,
                 **chaos_entry(list(outcomes), reference, recovery, await self.models_kept(),
                               len(orphans))}
        if kind != "remove_node":
            try:
                entry["restore_s"] = round(await self.ensure_two_copies(len(ACCELS)), 2)
            except Exception as e:  # noqa: BLE001 - reported, the next fault still runs
                entry["restore_error"] = repr(e)[:300]
        print(f"[chaos] {kind}: {entry}", file=sys.stderr)
        return entry


async def _bench(b: Bench, kinds: list[str]) -> dict:
    t = time.monotonic()
    await b.ensure_two_copies(want_devices=len(ACCELS))
    setup_s = time.monotonic() - t
    ref = await b.request(True, -1)
    ref_body = await b.request(False, -2)
    if ref.ending is not Ending.OK or ref_body.text != ref.text:
        raise RuntimeError(f"the undisturbed reference failed: {ref} / {ref_body.ending}")
    out = {"model": MODEL, "copies": sorted(await b.copies()), "setup_s": round(setup_s, 2),
           "in_flight_per_fault": {"streams": STREAMS, "non_streaming": BODIES,
                                   "max_tokens": MAX_TOKENS, "greedy": True},
           "bounds_s": {"request_end": END_BOUND_S, "recovery_poll": RECOVERY_BOUND_S,
                        "orphan_grace": ORPHAN_GRACE_S},
           "faults": []}
    for kind in faults.FAULTS:
        if kind not in kinds:
            out["faults"].append({"kind": kind, "status": "not run", "why": "not selected"})
            continue
        try:
            out["faults"].append(await b.one_fault(kind, ref.text))
        except Exception as e:  # noqa: BLE001 - one fault's failure is its entry
            out["faults"].append({"kind": kind, "status": "not run",
                                  "why": f"the bench failed: {e!r}"[:400]})
    await b.client.close()
    run = [f for f in out["faults"] if f["status"] == "run"]
    out["goals"] = {
        "every_fault_run": len(run) == len(faults.FAULTS),
        "recovery_s_max": max((f["recovery_s"] for f in run if f["recovery_s"] is not None),
                              default=None),
        "all_met_for_faults_run": all(f["goal_met"] for f in run) if run else None,
        "lost_total": sum(f["lost"] for f in run)}
    return out


def run_chaos_bench(models_dir: str, faults_to_run: list[str] | None = None,
                    port: int = 8019) -> dict:
    unknown = set(faults_to_run or ()) - set(faults.FAULTS)
    if unknown:
        raise ValueError(f"unknown fault(s) {sorted(unknown)}; choose from {faults.FAULTS}")
    os.environ.setdefault(REAP_ENV, "true")  # the raylets reap a dead worker's engine cores
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from cluster.bench import servers
    from cluster.control.controller import get_controller
    from serve_apps.app import build_app

    catalog = _catalog(models_dir)
    baseline = faults.all_engine_cores()  # other people's: never counted, never touched
    # As the test suite builds it (tests/conftest.py). Ray binds the nodes
    # to this machine's own address; node_ip_address="127.0.0.1" leaves the
    # driver dialling a GCS it cannot reach. The OpenAI traffic is on 127.0.0.1.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for accel, extra in ACCELS.items():
        cluster.add_node(num_cpus=0, num_gpus=1, resources={f"accelerator_type:{accel}": 1,
                                                            **extra})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"catalog": catalog}), name="shoal", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        servers.wait_healthy(url, timeout_s=120)
        result = asyncio.run(_bench(Bench(cluster, url, catalog, baseline),
                                    list(faults_to_run or faults.FAULTS)))
        try:
            ray.get(get_controller().shutdown_cluster.remote(), timeout=120)
        except Exception as e:  # noqa: BLE001 - reported; the cluster goes anyway
            result["shutdown_error"] = repr(e)[:300]
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    time.sleep(ORPHAN_GRACE_S)
    result["orphaned_engine_cores_after_shutdown"] = len(
        faults.orphaned_engine_cores(baseline))
    return result
