"""Device discovery from Ray node resources, and the policy view built from
worker stats: pure functions, fed with the shapes Ray and the workers return."""

from __future__ import annotations

from cluster.catalog import load_catalog
from cluster.control.discovery import discover_devices
from cluster.control.view_builder import build_view
from cluster.engine.contract import DeviceStats, ModelState, ModelStatus, WorkerStats

GiB = 2**30


def node(node_id: str, alive: bool = True, **resources) -> dict:
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": f"10.0.0.{len(node_id)}",
            "Resources": {"CPU": 8.0, **resources}}


NODES = [
    node("aaaaaaaaaa1", GPU=2.0, **{"accelerator_type:H100": 1.0, "node:__internal_head__": 1.0}),
    node("bbbbbbbbbb2", GPU=1.0, **{"accelerator_type:AMD-Instinct-MI300X-OAM": 1.0}),
    node("cccccccccc3", NPU=1.0, **{"accelerator_type:Ascend910B": 1.0, "shoal-cpu-box": 1.0}),
    node("dddddddddd4", alive=False, GPU=8.0),
]


def catalog(**extra):
    return load_catalog({"cpu_devices": [
        {"id": "cpu-head", "memory_bytes": GiB},
        {"id": "cpu-box", "memory_bytes": 2 * GiB, "node": "shoal-cpu-box", "cost_per_hour": 0.1},
        {"id": "cpu-gone", "memory_bytes": GiB, "node": "no-such-node"},
    ], "discovery": {"accelerators": {"H100": {"memory_bytes": 80 * GiB, "speed": 3.0}}}, **extra})


def test_accelerators_and_cpu_devices_are_discovered_per_node():
    devs = {d.id: d for d in discover_devices(NODES, catalog())}
    assert sorted(devs) == ["aaaaaaa1/gpu0", "aaaaaaa1/gpu1", "bbbbbbb2/gpu0",
                            "ccccccc3/npu0", "cpu-box", "cpu-head"]  # dead node and cpu-gone left out
    h100 = devs["aaaaaaa1/gpu0"]
    assert (h100.vendor, h100.kind, h100.accelerator_type) == ("nvidia", "cuda", "H100")
    assert h100.memory_bytes == 80 * GiB and h100.speed == 3.0 and h100.claim == (("GPU", 1.0),)
    assert (devs["bbbbbbb2/gpu0"].vendor, devs["bbbbbbb2/gpu0"].kind) == ("amd", "rocm")
    npu = devs["ccccccc3/npu0"]
    assert (npu.vendor, npu.claim) == ("huawei", (("NPU", 1.0),))
    assert npu.memory_bytes == 16 * GiB  # unknown type: the default
    assert devs["cpu-head"].node_id == "aaaaaaaaaa1"  # no node given: the head
    assert devs["cpu-box"].node_id == "cccccccccc3"  # matched by custom resource
    assert devs["cpu-box"].kind == "cpu" and devs["cpu-box"].claim == ()


def test_gaudi_hpus_and_fake_cluster_node_ids():
    """Intel Gaudi counts in HPU; the fake multi-node provider's node ids
    share their first 51 characters, and their devices must still differ."""
    fake = "f" * 51
    nodes = [node(fake + "00001", HPU=2.0, **{"accelerator_type:Intel-GAUDI": 1.0}),
             node(fake + "00002", GPU=1.0, **{"accelerator_type:H100": 1.0})]
    devs = {d.id: d for d in discover_devices(nodes, catalog())}
    assert sorted(devs) == ["cpu-head", "fff00001/hpu0", "fff00001/hpu1", "fff00002/gpu0"]
    assert (devs["fff00001/hpu0"].vendor, devs["fff00001/hpu0"].kind) == ("intel", "hpu")
    assert devs["fff00001/hpu0"].claim == (("HPU", 1.0),)


def test_addable_kinds_come_from_the_catalog_profiles():
    from cluster.control.elastic import node_kinds

    cat = catalog(capacity={"accelerators": {"H100": {"max_devices": 4}}})
    (k,) = node_kinds(cat)
    assert (k.name, k.vendor, k.memory_bytes, k.speed, k.max_devices) == \
        ("H100", "nvidia", 80 * GiB, 3.0, 4)
    assert node_kinds(catalog()) == ()


def test_emulated_accelerators_keep_their_labels_but_run_on_cpu():
    devs = discover_devices(NODES, catalog(discovery={"emulate_accelerators_on_cpu": True}))
    gpu = next(d for d in devs if d.accelerator_type == "H100")
    assert gpu.kind == "cpu" and gpu.vendor == "nvidia" and gpu.claim == (("GPU", 1.0),)


def test_view_from_worker_stats():
    cat = load_catalog({"models": [
        {"name": "m1", "path": "/x/m1", "family": "f", "weights_bytes": 100, "kv_cache_bytes": 10},
        {"name": "m2", "path": "/x/m2", "family": "f", "weights_bytes": 100, "kv_cache_bytes": 10,
         "allowed_vendors": ["NVIDIA"]},
        {"name": "m3", "path": "/x/m3", "family": "g", "weights_bytes": 5, "kv_cache_bytes": 5}],
        "cpu_devices": [{"id": "c0", "memory_bytes": 1000}, {"id": "c1", "memory_bytes": 500}]})
    devices = {d.id: d for d in discover_devices(NODES[:1], cat)}
    stats = {"c0": worker_stats(
        status("m1", ModelState.ACTIVE, running=2, waiting=1),
        status("m2", ModelState.PARKED),
        status("m3", ModelState.UNLOADING))}
    view = build_view(devices, stats, {m.name: m for m in cat.models}, {})
    assert [d.id for d in view.devices] == ["c0"]  # only devices with a live worker
    m1, m2, m3 = view.models
    assert m1.placements[0].state == "active" and m1.placements[0].inflight == 3
    assert m2.on("parked") == ("c0",) and m2.allowed_vendors == ("nvidia",)
    assert m3.placements == ()  # on its way out
    assert view.used_bytes("c0") == 110


def test_a_time_share_member_holds_memory_only_while_in_the_engine():
    cat = load_catalog({"models": [
        {"name": n, "path": f"/x/{n}", "family": "f", "weights_bytes": 100, "kv_cache_bytes": 10}
        for n in ("a", "b")], "cpu_devices": [{"id": "c0", "memory_bytes": 1000}]})
    devices = {d.id: d for d in discover_devices(NODES[:1], cat)}
    stats = {"c0": worker_stats(status("a", ModelState.TIMESHARED, in_engine=True),
                                status("b", ModelState.TIMESHARED, waiting=2))}
    view = build_view(devices, stats, {m.name: m for m in cat.models}, {})
    a, b = view.models
    assert a.placements[0].state == "active" and a.placements[0].timeshared
    assert b.placements[0].state == "parked" and b.placements[0].timeshared
    assert b.placements[0].inflight == 2
    assert view.used_bytes("c0") == 110  # one engine's worth, not two


def status(name: str, state: ModelState, running: int = 0, waiting: int = 0,
           in_engine: bool = False) -> ModelStatus:
    return ModelStatus(name=name, family="f", state=state,
                       routable=state in (ModelState.ACTIVE, ModelState.TIMESHARED),
                       in_engine=in_engine or state is ModelState.ACTIVE, draining=False,
                       shell=None, architecture="X", weights_bytes=100, kv_cache_bytes=10,
                       running=running, waiting=waiting, tokens_per_s=0.0, last_swap_s=None)


def worker_stats(*models: ModelStatus) -> WorkerStats:
    return WorkerStats(device=DeviceStats("c0", "cpu", "cpu", None, 0, 1000, 0, False),
                       shells={}, models={m.name: m for m in models}, groups={},
                       tokens_per_s=0.0)
