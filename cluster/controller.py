"""The placement controller: one named, detached Ray actor per cluster.

It discovers devices, keeps one engine worker per device, runs the policy
(on events and on a timer) and executes its actions, and owns the versioned
route table that front doors cache. It holds no state that the workers do
not also hold: the workers are detached named actors, so a restarted
controller finds them again and rebuilds placements and routes from their
``stats()``.

Cold start: a request for a model with no active copy waits in a bounded
per-model queue (``resolve``) while the policy loads it; a full queue or a
timeout is a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from typing import Any

from cluster.actuator import Actuator
from cluster.catalog import Catalog, ModelSpec
from cluster.device import DeviceSpec
from cluster.discovery import discover_devices
from cluster.errors import (ColdStartQueueFullError, LoadTimeoutError, ModelNotActiveError,
                            ShoalError, UnknownModelError, root_cause)
from cluster.view_builder import build_view
from policies import make_policy
from policies.actions import EVICTION_REASON, Load, Migrate, Unload
from policies.demand import DemandEstimator
from policies.view import Demand

log = logging.getLogger(__name__)

NAMESPACE = "shoal"
CONTROLLER_NAME = "shoal-controller"
WORKER_PREFIX = "shoal-worker:"
RPC_TIMEOUT_S = 10.0  # a worker that cannot answer stats() this fast is presumed dead
SWAP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf"))


def worker_actor_name(device_id: str) -> str:
    return WORKER_PREFIX + device_id


class PlacementController:
    def __init__(self, catalog: dict):
        self.catalog = Catalog.model_validate(catalog)
        self.cfg = self.catalog.controller
        self.specs: dict[str, ModelSpec] = {m.name: m for m in self.catalog.models}
        self.policy = make_policy(self.cfg.policy, **self.cfg.policy_config)
        self.demand = DemandEstimator()
        self.devices: dict[str, DeviceSpec] = {}
        self.workers: dict[str, Any] = {}  # device id -> worker actor handle
        self.stats: dict[str, dict] = {}  # device id -> last worker stats()
        # Polls overlap (health loop, reconcile): a reply is applied only if
        # its poll was sent after the one that wrote the current stats, so a
        # slow, older reply never overwrites a newer state.
        self._polls = 0
        self._stats_poll: dict[str, int] = {}  # device id -> latest poll applied
        # Versions only grow, across controller restarts too, so a front door
        # never mistakes an old table for a new one.
        self.version = time.time_ns() // 1000
        self.routes: dict[str, list[str]] = {}  # model -> devices with an active copy
        self._unrouted: set[tuple[str, str]] = set()  # (model, device) being taken out
        self.waiters: dict[str, list[asyncio.Future]] = {}
        self.displaced: set[str] = set()  # lost with a dead worker, to re-place
        self.problems: dict[str, str] = {}  # model -> why it could not be placed
        self.log: deque[dict] = deque(maxlen=200)  # recent actions
        self.action_counts: Counter[str] = Counter()  # "model|kind" -> executed actions
        self.swap_hist = [0] * len(SWAP_BUCKETS_S)  # cumulative, Prometheus style
        self.swap_sum_s = 0.0
        self.actuator = Actuator(self._worker, self._spec_dict, self._unroute, self._poll)
        self._lock = asyncio.Lock()  # one reconcile (decide + execute) at a time
        self._kick = asyncio.Event()
        self._ready = asyncio.Event()
        loop = asyncio.get_event_loop()
        self._tasks = [loop.create_task(self._main()), loop.create_task(self._health())]

    # ------------------------------------------------------------ data path
    async def resolve(self, model: str, timeout_s: float | None = None) -> dict:
        """Routes for ``model``, waiting in the cold-start queue if needed."""
        spec = self._spec(model)
        await self._ready.wait()
        self.demand.observe(model, time.time())
        if self.routes.get(model):
            return self.route_table()
        waiting = self.waiters.setdefault(model, [])
        if len(waiting) >= self.cfg.cold_queue_max:
            raise ColdStartQueueFullError(
                f"model {model!r} is loading and {len(waiting)} requests already wait for it "
                f"(cold_queue_max={self.cfg.cold_queue_max})", retry_after_s=5.0)
        fut = asyncio.get_running_loop().create_future()
        waiting.append(fut)
        self._kick.set()
        timeout = timeout_s or spec.load_timeout_s or self.cfg.load_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            why = self.problems.get(model, "it is still loading")
            raise LoadTimeoutError(f"model {model!r} ({spec.family}) was not ready within "
                                   f"{timeout:.0f} s: {why}", retry_after_s=10.0) from None
        finally:
            if fut in waiting:
                waiting.remove(fut)
        return self.route_table()

    def note_arrivals(self, counts: dict[str, int]) -> None:
        """Arrivals a front door served from its cached routes (demand input)."""
        now = time.time()
        for model, n in counts.items():
            if model in self.specs:
                self.demand.observe(model, now, n)

    def route_table(self, since_version: int = -1) -> dict | None:
        """``{"version", "routes": {model: [[device, worker handle], ...]}}``;
        None when the caller's cached version is current."""
        if since_version == self.version:
            return None
        return {"version": self.version,
                "routes": {m: [[d, self.workers[d]] for d in devs if d in self.workers]
                           for m, devs in self.routes.items()}}

    async def report_failure(self, device_id: str) -> None:
        """A front door saw a worker die mid-stream; check it now."""
        await self._poll()
        self._kick.set()

    # ---------------------------------------------------------------- admin
    async def tick(self) -> list[dict]:
        """Run the policy once now and execute its actions; returns their log."""
        await self._ready.wait()
        return await self._reconcile()

    async def load(self, model: str, device: str | None = None) -> dict:
        """Admin load: on ``device``, or wherever the policy puts a requested model."""
        self._spec(model)
        if device is None:
            await self.resolve(model)
            return self.model_status(model)
        # A use without an arrival: the idle timer starts now, so the policy
        # keeps the copy for idle_unload_s even if no request comes.
        self.demand.observe(model, time.time(), 0)
        dev = self._device(device).id
        await self._execute_now(lambda: [Load(model, dev, reason="admin")])
        return self.model_status(model)

    async def unload(self, model: str) -> dict:
        """Admin unload of every copy; demand before now is forgotten so the
        policy does not bring it straight back."""
        self._spec(model)
        self.demand.forget(model)
        self.displaced.discard(model)
        await self._execute_now(lambda: [Unload(model, d, reason="admin")
                                         for d, s in self.stats.items() if model in s["models"]])
        return self.model_status(model)

    async def migrate(self, model: str, target: str, source: str | None = None) -> dict:
        self._spec(model)
        self._device(target)

        def plan() -> list:
            active = [d for d in self.routes.get(model, []) if d != target]
            src = source or (active[0] if active else None)
            if src is None:
                raise ModelNotActiveError(f"model {model!r} has no active copy to migrate "
                                          f"(other than on {target!r})")
            return [Migrate(model, src, target, reason="admin")]
        await self._execute_now(plan)
        return self.model_status(model)

    async def status(self) -> dict:
        await self._ready.wait()
        return {
            "version": self.version, "policy": self.policy.name,
            "busy": self._lock.locked(),  # executing actions right now
            "devices": [self._device_status(d) for d in sorted(self.devices)],
            "models": [self.model_status(m) for m in sorted(self.specs)],
            "recent_actions": list(self.log)[-20:],
            "capacity_requests": self.actuator.capacity_requests,
        }

    def model_status(self, model: str) -> dict:
        copies = {d: s["models"][model] for d, s in sorted(self.stats.items())
                  if model in s["models"]}
        states = {c["state"] for c in copies.values()}
        # A time-shared copy serves while parked: the model counts as active.
        state = "active" if any(c.get("servable") for c in copies.values()) else \
            next((s for s in ("active", "loading", "parked") if s in states), "cold")
        d = self._demand(model, time.time())
        return {"name": model, "family": self.specs[model].family, "state": state,
                "devices": {dev: c["state"] for dev, c in copies.items()},
                # Per copy: time-shared or not, and its smoothed latencies.
                "latency": {dev: {"timeshared": bool(c.get("timeshared")),
                                  "ttft_s": c.get("ttft_s"), "tpot_s": c.get("tpot_s")}
                            for dev, c in copies.items()},
                "replicas": len(self.routes.get(model, [])), "queue": d.queue,
                "inflight": d.inflight, "rate": round(d.rate, 4),
                "problem": self.problems.get(model)}

    def metrics(self) -> dict:
        """Control-plane numbers for the front door's /metrics."""
        return {"queue": {m: len(self.waiters.get(m, [])) for m in sorted(self.specs)},
                "actions": dict(self.action_counts),
                "swap_seconds": {"buckets": list(zip(SWAP_BUCKETS_S, self.swap_hist)),
                                 "sum": self.swap_sum_s},
                "devices": [self._device_status(d) for d in sorted(self.devices)]}

    async def shutdown_cluster(self) -> None:
        """Stop every engine worker (``shoal down``); the controller goes next."""
        import ray

        for t in self._tasks:
            t.cancel()
        for dev, w in list(self.workers.items()):
            try:
                await asyncio.wait_for(w.shutdown.remote(), RPC_TIMEOUT_S)
            except Exception:
                pass
            ray.kill(w, no_restart=True)
        self.workers.clear()
        self.stats.clear()

    def ping(self) -> int:
        return self.version

    # ------------------------------------------------------------ internals
    async def _main(self) -> None:
        try:
            await self._discover()
            await self._poll()
        except Exception:
            log.exception("controller start-up failed")
        self._ready.set()
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), self.cfg.tick_s or None)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            try:
                await self._reconcile()
            except Exception:
                log.exception("reconcile failed")

    async def _health(self) -> None:
        await self._ready.wait()
        while True:
            await asyncio.sleep(self.cfg.health_check_s)
            lost = await self._poll()
            if lost:
                self._kick.set()

    async def _discover(self) -> None:
        """(Re)read Ray's nodes; get or create a worker for every device."""
        import ray

        for dev in discover_devices(ray.nodes(), self.catalog):
            if dev.id not in self.workers:
                self.devices[dev.id] = dev
                self.workers[dev.id] = _get_or_start_worker(dev)

    async def _poll(self) -> list[str]:
        """Refresh every worker's stats; forget dead workers. Returns those lost."""
        self._polls += 1
        poll, asked = self._polls, dict(sorted(self.workers.items()))
        results = await asyncio.gather(
            *(asyncio.wait_for(w.stats.remote(), RPC_TIMEOUT_S) for w in asked.values()),
            return_exceptions=True)
        lost = []
        for (dev, worker), res in zip(asked.items(), results):
            if poll < self._stats_poll.get(dev, 0) or self.workers.get(dev) is not worker:
                continue  # a newer poll answered, or the worker was replaced meanwhile
            self._stats_poll[dev] = poll
            if isinstance(res, BaseException):
                lost.append(dev)
                self._forget_worker(dev, res)
            else:
                self.stats[dev] = res
        self._publish_routes()
        return lost

    def _forget_worker(self, dev: str, err: BaseException) -> None:
        log.warning("engine worker for %s is gone (%s); re-placing its models", dev, err)
        held = self.stats.pop(dev, {}).get("models", {})
        self.workers.pop(dev, None)
        for model, m in held.items():
            if m["state"] in ("active", "loading") or m.get("timeshared"):
                self.displaced.add(model)
        self.log.append({"at": time.time(), "action": f"WorkerLost({dev})",
                         "models": sorted(held)})

    def _publish_routes(self) -> None:
        routes: dict[str, list[str]] = {}
        for dev in sorted(self.stats):
            for model, m in self.stats[dev]["models"].items():
                if m.get("servable", m["state"] == "active" and not m.get("draining")) \
                        and (model, dev) not in self._unrouted:
                    routes.setdefault(model, []).append(dev)
        if routes != self.routes:
            self.routes = routes
            self.version += 1
        for model in routes:
            self.displaced.discard(model)
            self.problems.pop(model, None)
            for fut in self.waiters.get(model, []):
                if not fut.done():
                    fut.set_result(True)

    async def _unroute(self, model: str, device: str) -> None:
        self._unrouted.add((model, device))
        self._publish_routes()

    def _demand(self, model: str, now: float) -> Demand:
        inflight = sum(s["models"][model]["running"] + s["models"][model]["waiting"]
                       for s in self.stats.values() if model in s["models"])
        queue = len(self.waiters.get(model, [])) + (model in self.displaced)
        return self.demand.demand(model, now, queue, inflight)

    async def _reconcile(self) -> list[dict]:
        async with self._lock:
            await self._discover()
            await self._poll()
            now = time.time()
            view = build_view(self.devices, self.stats, self.specs,
                              {m: self._demand(m, now) for m in self.specs})
            actions = self.policy.decide(view, now)
            done = await self._execute(actions)
            return [{k: v for k, v in d.items() if k != "exception"} for d in done]

    async def _execute_now(self, plan) -> list[dict]:
        """Admin actions: planned from fresh stats under the reconcile lock
        (so a policy action that just moved the model is seen), then run."""
        async with self._lock:
            await self._poll()
            done = await self._execute(plan())
        failed = [d for d in done if "error" in d]
        if failed:
            raise failed[0]["exception"]
        return done

    async def _execute(self, actions: list) -> list[dict]:
        if not actions:
            return []
        done: dict[int, dict] = {}

        async def run_chain(chain: list[int]) -> None:
            for i in chain:  # in the policy's order: a park-load before its swap
                try:
                    res = await self.actuator.run(actions[i])
                except Exception as e:
                    res = e
                done[i] = self._record(actions[i], res)  # logged as each one ends

        await asyncio.gather(*(run_chain(c) for c in _chains(actions)))
        self._unrouted.clear()
        await self._poll()
        return [done[i] for i in range(len(actions))]

    def _record(self, a, res) -> dict:
        rec = {"at": time.time(), "action": repr(a), "reason": a.reason}
        if isinstance(res, BaseException):
            res = root_cause(res)
            rec["error"] = f"{type(res).__name__}: {res}"
            model = getattr(a, "model", None) or getattr(a, "for_model", None)
            if model:
                self.problems[model] = rec["error"]
                if isinstance(res, ShoalError) and res.status == 400:
                    self._fail_waiters(model, res)  # a bad checkpoint will not get better
            log.warning("action %r failed: %s", a, rec["error"])
        else:
            self._count(a, res)
        self.log.append(rec)
        return {**rec, "exception": res} if "error" in rec else rec

    def _count(self, a, res) -> None:
        kind = _KIND.get(type(a).__name__, type(a).__name__.lower())
        if kind in ("park", "unload") and a.reason.startswith(EVICTION_REASON):
            kind = "evict"
        model = getattr(a, "model", None) or getattr(a, "for_model", "")
        self.action_counts[f"{model}|{kind}"] += 1
        swap_s = res.get("last_swap_s") if kind == "swap" and isinstance(res, dict) else None
        if swap_s is not None:
            self.swap_sum_s += swap_s
            for i, bound in enumerate(SWAP_BUCKETS_S):
                self.swap_hist[i] += swap_s <= bound

    def _fail_waiters(self, model: str, err: Exception) -> None:
        for fut in self.waiters.get(model, []):
            if not fut.done():
                fut.set_exception(err)

    def _spec(self, model: str) -> ModelSpec:
        spec = self.specs.get(model)
        if spec is None:
            raise UnknownModelError(f"model {model!r} is not in the catalog; "
                                    f"known: {sorted(self.specs)}")
        return spec

    def _spec_dict(self, model: str) -> dict:
        return self._spec(model).model_dump(mode="json")

    def _device(self, device: str) -> DeviceSpec:
        if device not in self.devices:
            raise UnknownModelError(f"device {device!r} is unknown; known: {sorted(self.devices)}")
        return self.devices[device]

    def _worker(self, device: str):
        w = self.workers.get(device)
        if w is None:
            raise ShoalError(f"device {device!r} has no live engine worker")
        return w

    def _device_status(self, dev: str) -> dict:
        d, s = self.devices[dev], self.stats.get(dev, {}).get("device", {})
        return {"id": d.id, "node": d.node_id, "vendor": d.vendor, "kind": d.kind,
                "accelerator_type": d.accelerator_type, "speed": d.speed,
                "cost_per_hour": d.cost_per_hour, "alive": dev in self.stats,
                "memory_used_bytes": s.get("memory_used_bytes"),
                "memory_budget_bytes": d.memory_bytes,
                "models": sorted(self.stats.get(dev, {}).get("models", {}))}


_KIND = {"Load": "load", "ScaleOut": "load", "Wake": "load", "Swap": "swap",
         "Migrate": "migrate", "Park": "park", "Unload": "unload", "ScaleIn": "unload",
         "RequestCapacity": "capacity_request"}


def _devices_of(a) -> set[str]:
    return {getattr(a, f) for f in ("device", "source", "target") if hasattr(a, f)}


def _chains(actions: list) -> list[list[int]]:
    """Group action indices so actions that share a device run one after
    another (in order) while independent devices proceed in parallel."""
    chains: list[tuple[set[str], list[int]]] = []
    for i, a in enumerate(actions):
        devs = _devices_of(a)
        joined = [c for c in chains if c[0] & devs]
        merged_devs, merged = set(devs), []
        for c in joined:
            chains.remove(c)
            merged_devs |= c[0]
            merged += c[1]
        chains.append((merged_devs, sorted(merged) + [i]))
    return [c[1] for c in chains]


def _get_or_start_worker(dev: DeviceSpec):
    """The device's worker: the live one if a previous controller made it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.engine_worker import start_engine_worker

    name = worker_actor_name(dev.id)
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    claim = dict(dev.claim)
    opts: dict[str, Any] = {"namespace": NAMESPACE, "lifetime": "detached",
                            "get_if_exists": True}
    if dev.node_id:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(dev.node_id, soft=False)
    if "GPU" in claim:
        opts["num_gpus"] = claim.pop("GPU")
    if claim:
        opts["resources"] = claim
    return start_engine_worker(dev, name=name, **opts)


def get_or_create_controller(catalog: Catalog):
    """The cluster's controller; created (detached, auto-restarting) if absent.

    ``max_task_retries=-1``: a call that a controller restart interrupts, or
    that arrives while it restarts, is retried on the new incarnation instead
    of failing (its methods are safe to repeat: reads, idempotent admin
    actions, a cold-start wait)."""
    import ray

    return ray.remote(PlacementController).options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, max_concurrency=1000, num_cpus=0,
    ).remote(catalog.model_dump(mode="json"))


def get_controller():
    import ray

    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
