"""The placement controller: one named, detached Ray actor per cluster.

It discovers devices, keeps one engine worker per device, runs the policy
(on events and on a timer) and executes its actions, and owns the versioned
route table that front doors cache. It holds no state that the workers do
not also hold: the workers are detached named actors, so a restarted
controller finds them again and rebuilds placements and routes from their
``stats()``.

Cold start: a request for a model with no active copy waits in a bounded
per-model queue (``resolve``) while the policy loads it; a full queue or a
timeout is a 503 with Retry-After, and so, at once, is a model no device
here may run and the autoscaler cannot add one for (``Elastic``).

Elastic capacity (``cluster/control/elastic.py``): each round's placement
actions come with the one standing request to Ray's autoscaler, and devices
empty long enough are released (worker stopped, so the node can go) or
taken back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from cluster.catalog import Catalog, ModelSpec
from cluster.control.action_counts import ActionCounts
from cluster.control.actuator import Actuator, chains
from cluster.control.elastic import Elastic
from cluster.control.fleet import NAMESPACE, Fleet, RayFleet, is_actor_death
from cluster.control.status import device_status, model_status
from cluster.control.view_builder import build_view
from cluster.engine.contract import ModelState, WorkerStats
from cluster.engine.device import DeviceSpec
from cluster.errors import (ColdStartQueueFullError, LoadTimeoutError, ModelNotActiveError,
                            NoCapacityError, ShoalError, UnknownDeviceError, UnknownModelError,
                            root_cause)
from policies import make_policy
from policies.actions import Load, Migrate, Unload
from policies.demand import DemandEstimator
from policies.view import Demand

log = logging.getLogger(__name__)

CONTROLLER_NAME = "shoal-controller"
RPC_TIMEOUT_S = 10.0  # one stats() poll of a worker gives up after this
# A worker that has not answered this many polls in a row is hung: it is
# killed and replaced. One slow answer is not a death (an engine starting on
# a loaded machine can starve a worker's event loop for a while), and a
# worker that is forgotten while it still lives would be found again by the
# next discovery with its models placed twice.
UNRESPONSIVE_POLLS = 3
# ... unless it has never answered yet: a worker on a node that just joined
# may take minutes to start (process, runtime env) on a loaded or real
# cluster; killing it after three polls would restart that from scratch.
WORKER_START_GRACE_S = 300.0


class PlacementController:
    def __init__(self, catalog: dict, fleet: Fleet | None = None):
        self.catalog = Catalog.model_validate(catalog)
        self.fleet: Fleet = fleet or RayFleet()
        self.rpc_timeout_s = RPC_TIMEOUT_S
        self.cfg = self.catalog.controller
        self.specs: dict[str, ModelSpec] = {m.name: m for m in self.catalog.models}
        self.policy = make_policy(self.cfg.policy, **self.cfg.policy_config)
        self.elastic = Elastic(self.catalog, self.policy, self.fleet, self._worker,
                               self._drop_worker, self._rediscover)
        self.demand = DemandEstimator(self.cfg.demand_half_life_s)
        self.devices: dict[str, DeviceSpec] = {}
        self.workers: dict[str, Any] = {}  # device id -> worker actor handle
        self.stats: dict[str, WorkerStats] = {}  # device id -> last worker stats()
        self._silent: dict[str, int] = {}  # device id -> polls unanswered in a row
        self._born: dict[str, float] = {}  # device id -> when its worker was created here
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
        self.counts = ActionCounts()  # for /metrics
        self.actuator = Actuator(self._worker, self._spec_dict, self._unroute, self._poll,
                                 self.elastic)
        self._lock = asyncio.Lock()  # one reconcile (decide + execute) at a time
        self._kick = asyncio.Event()
        self._ready = asyncio.Event()
        loop = asyncio.get_event_loop()
        self._tasks = [loop.create_task(self._main()), loop.create_task(self._health())]

    # ------------------------------------------------------------ data path
    async def resolve(self, model: str, timeout_s: float | None = None,
                      resuming: bool = False) -> dict:
        """Routes for ``model``, waiting in the cold-start queue if needed.

        ``resuming``: a request already accepted, continuing after its copy
        went away. It is no new arrival, and the queue's bound (which sheds
        new load early) does not apply: shedding it would lose the request."""
        spec = self._spec(model)
        await self._ready.wait()
        if not resuming:
            self.demand.observe(model, time.time())
        if self.routes.get(model):
            return self.route_table()
        why = self.elastic.why_unplaceable(spec, list(self.devices.values()))
        if why is not None:
            raise NoCapacityError(why, retry_after_s=30.0)
        waiting = self.waiters.setdefault(model, [])
        if not resuming and len(waiting) >= self.cfg.cold_queue_max:
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
                                         for d, s in self.stats.items() if model in s.models])
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
            "problems": dict(sorted(self.problems.items())),
            "recent_actions": list(self.log)[-20:],
            "capacity_requests": self.elastic.wants(),
            "capacity": self.elastic.status(),
        }

    def model_status(self, model: str) -> dict:
        copies = {d: s.models[model] for d, s in sorted(self.stats.items()) if model in s.models}
        return model_status(self.specs[model], copies, len(self.routes.get(model, [])),
                            self._demand(model, time.time()), self.problems.get(model))

    def metrics(self) -> dict:
        """Control-plane numbers for the front door's /metrics."""
        return {"queue": {m: len(self.waiters.get(m, [])) for m in sorted(self.specs)},
                **self.counts.snapshot(),
                "devices": [self._device_status(d) for d in sorted(self.devices)],
                # per time-sharing device, its schedulers' totals (workers report them)
                "timeshare": {d: {"switches": sum(g.switches for g in s.groups.values()),
                                  "preemptions": sum(g.preemptions for g in s.groups.values())}
                              for d, s in sorted(self.stats.items()) if s.groups}}

    async def shutdown_cluster(self) -> None:
        """Stop every engine worker (``shoal down``); the controller goes next."""
        for t in self._tasks:
            t.cancel()
        for dev, w in list(self.workers.items()):
            try:
                await asyncio.wait_for(w.shutdown.remote(), self.rpc_timeout_s)
            except Exception:
                pass
            self.fleet.kill(w)
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
        """(Re)read the fleet's devices; get or create a worker for every one
        not released; forget devices whose node is gone."""
        found = {d.id: d for d in self.fleet.discover(self.catalog)}
        for gone in [d for d in self.devices if d not in found and d not in self.workers]:
            del self.devices[gone]
        for dev in found.values():
            if dev.id not in self.workers:
                self.devices[dev.id] = dev
                if dev.id not in self.elastic.released:
                    self.workers[dev.id] = self.fleet.worker(dev)
                    self._born[dev.id] = time.monotonic()

    async def _poll(self) -> list[str]:
        """Refresh every worker's stats; forget dead workers. Returns those lost.

        A dead actor is forgotten at once. A worker that does not answer in
        time keeps its last stats (its copies stay routed: requests to a dead
        copy fail over in the router) until ``UNRESPONSIVE_POLLS`` polls in a
        row go unanswered; then it is killed and replaced."""
        self._polls += 1
        poll, asked = self._polls, dict(sorted(self.workers.items()))
        results = await asyncio.gather(
            *(asyncio.wait_for(w.stats.remote(), self.rpc_timeout_s) for w in asked.values()),
            return_exceptions=True)
        lost = []
        for (dev, worker), res in zip(asked.items(), results):
            if poll < self._stats_poll.get(dev, 0) or self.workers.get(dev) is not worker:
                continue  # a newer poll answered, or the worker was replaced meanwhile
            self._stats_poll[dev] = poll
            if not isinstance(res, BaseException):
                self.stats[dev] = res
                self._silent.pop(dev, None)
                continue
            self._silent[dev] = self._silent.get(dev, 0) + 1
            starting = dev not in self.stats and \
                time.monotonic() - self._born.get(dev, 0.0) < WORKER_START_GRACE_S
            if is_actor_death(res) or (self._silent[dev] >= UNRESPONSIVE_POLLS and not starting):
                lost.append(dev)
                self._forget_worker(dev, res)
            else:
                log.warning("engine worker for %s did not answer (%s); keeping its last stats",
                            dev, type(res).__name__)
        self._publish_routes()
        return lost

    def _forget_worker(self, dev: str, err: BaseException) -> None:
        log.warning("engine worker for %s is gone (%s); re-placing its models", dev, err)
        held = self.stats.pop(dev).models if dev in self.stats else {}
        worker = self.workers.pop(dev, None)
        self._silent.pop(dev, None)
        if worker is not None and not is_actor_death(err):
            try:  # hung, not dead: make sure it never comes back with these models
                self.fleet.kill(worker)
            except Exception:  # noqa: BLE001 - already gone
                pass
        for model, m in held.items():
            if m.state in (ModelState.ACTIVE, ModelState.LOADING, ModelState.TIMESHARED):
                self.displaced.add(model)
        self.log.append({"at": time.time(), "action": f"WorkerLost({dev})",
                         "models": sorted(held)})

    def _publish_routes(self) -> None:
        routes: dict[str, list[str]] = {}
        for dev in sorted(self.stats):
            for model, m in self.stats[dev].models.items():
                if m.routable and (model, dev) not in self._unrouted:
                    routes.setdefault(model, []).append(dev)
        if routes != self.routes:
            self.routes = routes
            self.version += 1
        for model in routes:
            self.displaced.discard(model)
            self.problems.pop(model, None)
            released = [f for f in self.waiters.get(model, []) if not f.done()]
            if released:
                # A use without an arrival: the idle timer starts now, when
                # they are served, not at their arrival; a cold start longer
                # than idle_unload_s (a new node, a big model) would
                # otherwise look idle the moment it is ready, and be unloaded
                # before the requests that waited for it run.
                self.demand.observe(model, time.time(), 0)
            for fut in released:
                fut.set_result(True)

    async def _unroute(self, model: str, device: str) -> None:
        self._unrouted.add((model, device))
        self._publish_routes()

    def _demand(self, model: str, now: float) -> Demand:
        inflight = sum(s.models[model].inflight for s in self.stats.values() if model in s.models)
        queue = len(self.waiters.get(model, [])) + (model in self.displaced)
        return self.demand.demand(model, now, queue, inflight)

    async def _reconcile(self) -> list[dict]:
        async with self._lock:
            await self._discover()
            await self._poll()
            now = time.time()
            view = build_view(self.devices, self.stats, self.specs,
                              {m: self._demand(m, now) for m in self.specs})
            spare = [self.devices[d] for d in sorted(self.elastic.released)
                     if d in self.devices and d not in self.workers]
            actions = self.elastic.decide(view, spare, now)
            for model, why in self.elastic.state.unmet.items():
                self.problems[model] = f"no capacity can be requested for it: {why}"
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
                t0 = time.monotonic()
                try:
                    res = await self.actuator.run(actions[i])
                except Exception as e:
                    res = e
                done[i] = self._record(actions[i], res, time.monotonic() - t0)  # as each ends

        await asyncio.gather(*(run_chain(c) for c in chains(actions)))
        self._unrouted.clear()
        await self._poll()
        return [done[i] for i in range(len(actions))]

    def _record(self, a, res, duration_s: float = 0.0) -> dict:
        rec = {"at": time.time(), "action": repr(a), "reason": a.reason,
               "duration_s": round(duration_s, 3)}
        if isinstance(res, dict) and "moved_requests" in res:  # streams carried by a move
            rec["moved_requests"] = res["moved_requests"]
        if isinstance(res, BaseException):
            res = root_cause(res)
            rec["error"] = f"{type(res).__name__}: {res}"
            self.elastic.failed(a)
            model = getattr(a, "model", None) or getattr(a, "for_model", None)
            if model:
                self.problems[model] = rec["error"]
                if isinstance(res, ShoalError) and res.status == 400:
                    self._fail_waiters(model, res)  # a bad checkpoint will not get better
            log.warning("action %r failed: %s", a, rec["error"])
        else:
            self.counts.count(a, res)
        self.log.append(rec)
        return {**rec, "exception": res} if "error" in rec else rec

    async def _rediscover(self) -> None:
        """A device came back into service: give it a worker, plan again."""
        await self._discover()
        self._kick.set()

    def _drop_worker(self, device: str):
        """Forget a released device's worker (the caller stops it); returns it."""
        self.stats.pop(device, None)
        self._silent.pop(device, None)
        return self.workers.pop(device)

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
            raise UnknownDeviceError(f"device {device!r} is unknown; known: {sorted(self.devices)}")
        return self.devices[device]

    def _worker(self, device: str):
        w = self.workers.get(device)
        if w is None:
            raise ShoalError(f"device {device!r} has no live engine worker")
        return w

    def _device_status(self, dev: str) -> dict:
        return device_status(self.devices[dev], self.stats.get(dev))


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
