"""The faults ``shoal bench chaos`` injects into a local multi-node Ray
cluster (``ray.cluster_utils.Cluster``), and the orphan count.

Each injector takes the ``Target``: the cluster, the device whose copy
has the requests in flight, and that device's node; it returns a line
saying what it hit. Only processes of this bench's own cluster are
touched: engine-core processes are found among the descendants of its
raylets, never by name across the machine.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

ENGINE_CORE = "EngineCore"  # vLLM's engine-core process title (VLLM::EngineCore)
FAULTS = ("kill_worker", "sigkill_engine_core", "kill_controller", "kill_ingress",
          "remove_node")


@dataclass(frozen=True)
class Target:
    cluster: object  # ray.cluster_utils.Cluster
    device: str  # the device whose copy serves the requests in flight
    node: object  # that device's ray._private.node.Node


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def _is_engine_core(p) -> bool:
    try:
        return ENGINE_CORE in " ".join(p.cmdline()) or ENGINE_CORE in p.name()
    except Exception:  # noqa: BLE001 - gone or not ours to read
        return False


def engine_cores_under(pid: int) -> list[int]:
    """Engine-core pids among the descendants of ``pid`` (a raylet)."""
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p.pid for p in kids if _is_engine_core(p)]


def all_engine_cores() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter() if _is_engine_core(p)}


def orphaned_engine_cores(ignore: set[int]) -> list[int]:
    """Engine cores (not in ``ignore``: the machine's before the bench)
    whose parent is gone or is no Ray worker (``ray::...``): reparented to
    init or to a raylet that has not reaped them."""
    import psutil

    out = []
    for pid in all_engine_cores() - ignore:
        try:
            parent = psutil.Process(pid).parent()
            ok = parent is not None and " ".join(parent.cmdline()).startswith("ray::")
        except psutil.NoSuchProcess:
            continue  # it ended while we looked: not an orphan
        if not ok:
            out.append(pid)
    return out


def kill_worker(t: Target) -> str:
    import ray

    from cluster.control.fleet import NAMESPACE, worker_actor_name

    ray.kill(ray.get_actor(worker_actor_name(t.device), namespace=NAMESPACE))
    return f"ray.kill of the engine worker of {t.device}"


def _chain(pid: int) -> list[str]:
    import psutil

    try:
        return [f"{p.pid}:{p.name()}" for p in psutil.Process(pid).parents()]
    except psutil.NoSuchProcess:
        return []


def sigkill_engine_core(t: Target) -> str:
    pids = engine_cores_under(raylet_pid(t.node))
    if not pids:
        # The first run found none under the raylet (unexplained yet): say
        # where every engine core of this machine sits, for the next look.
        where = {pid: _chain(pid)[:4] for pid in sorted(all_engine_cores())}
        raise RuntimeError(f"no engine-core process under the raylet "
                           f"{raylet_pid(t.node)} of {t.device}'s node; engine cores and "
                           f"their parents: {where}")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return f"SIGKILL of engine core(s) {pids} on {t.device}'s node"


def kill_controller(t: Target) -> str:
    import ray

    from cluster.control.controller import get_controller

    ray.kill(get_controller(), no_restart=False)  # detached, max_restarts=-1: Ray restarts it
    return "ray.kill of the controller actor (restartable)"


def kill_ingress(t: Target) -> str:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::shoal#ShoalIngress")]
    if len(names) != 1:
        raise RuntimeError(f"expected one ingress replica, found {names}")
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    return f"ray.kill of the ingress replica {names[0]['name']}"


def remove_node(t: Target) -> str:
    t.cluster.remove_node(t.node)
    return f"Cluster.remove_node of {t.device}'s node"


INJECT = {"kill_worker": kill_worker, "sigkill_engine_core": sigkill_engine_core,
          "kill_controller": kill_controller, "kill_ingress": kill_ingress,
          "remove_node": remove_node}
