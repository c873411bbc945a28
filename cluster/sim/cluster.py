"""A simulated cluster: devices, engines, routing, and the controller loop.

The controller part does what the live controller does
(``cluster/control/controller.py``): on a timer and whenever a request
finds no copy of its model, it builds a ``ClusterView`` from the cluster's
state (the same view the live view builder makes from worker stats), asks
the policy ``decide(view, now)`` and carries out the actions with the
engine worker's semantics (``cluster/sim/worker.py``). Requests go to the
least busy ready copy of their model, or wait in a per-model cold queue
until one is ready. A request taken off a copy (unload, migration, scale-in)
resumes elsewhere from the tokens it has, as the live router resumes it.

Every action is first checked against the view it was decided on with
``policies.plan.apply``; one that breaks a placement rule (over-commit,
vendor, duplicate ...) is a policy bug: it is recorded in ``violations``
(and raises ``SimulationError`` when ``strict``), and not carried out.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence

from policies import make_policy
from policies.demand import DemandEstimator
from policies.plan import InvalidAction, apply
from policies.smoothing import ewma
from policies.view import ACTIVE, LOADING, PARKED, ClusterView, ModelView, Placement

from cluster.sim.costmodel import cost_model
from cluster.sim.device import SimDevice
from cluster.sim.engine import SimEngine, SimRequest
from cluster.sim.events import EventQueue
from cluster.sim.profiles import DeviceProfile, ModelProfile
from cluster.sim.results import Results
from cluster.sim.systems import ServedModel, System, kv_cache_bytes
from cluster.sim.workload import Arrival
from cluster.sim import worker

TICK_S = 2.0  # the live controller's default timer (ControllerConfig.tick_s)
# A request finding no copy kicks the controller, as live; kicks coming
# closer together than this share one round (a live round polls every
# worker and waits for its actions, so it is not free either). Assumption.
KICK_GAP_S = 0.2


class SimulationError(RuntimeError):
    """The simulated cluster broke a rule (strict mode); the message says which."""


class SimCluster:
    def __init__(self, system: System, devices: Sequence[tuple[str, DeviceProfile]],
                 models: Sequence[ServedModel], policy=None, strict: bool = False,
                 tick_s: float = TICK_S, kick_gap_s: float = KICK_GAP_S):
        self.system, self.strict = system, strict
        self.tick_s, self.kick_gap_s = tick_s, kick_gap_s
        self.q = EventQueue()
        profiles = [p for _, p in devices]
        reference = max(p.memory_bandwidth_bytes_per_s for p in profiles)
        self.devices = {d: SimDevice(d, p, cost_model(p), system.turns is not None, reference)
                        for d, p in devices}
        self.served = {m.name: m for m in models}
        self.kv_bytes = {m.name: kv_cache_bytes(system, m, profiles) for m in models}
        self.copies: dict[str, list[SimEngine]] = {m.name: [] for m in models}
        self.waiters: dict[str, deque[SimRequest]] = {m.name: deque() for m in models}
        self.policy = policy if policy is not None else (
            make_policy(system.policy, **system.policy_config) if system.policy else None)
        self.demand = DemandEstimator()
        self.latency: dict[tuple[str, str], tuple[float, float]] = {}  # (model, device) -> ewma
        self.actions: Counter[str] = Counter()
        self.failures: list[str] = []  # actions the simulated workers refused
        self.violations: list[str] = []  # actions that broke a rule of the view: policy bugs
        self.capacity_requests = 0
        self._engine_ids = 0
        self.closed_engines: list[SimEngine] = []  # kept for their counters
        self._views: dict[str, ModelView] = {}  # the last view of each model
        self._decide_pending = False
        self._last_decide = float("-inf")
        self.results: Results | None = None

    # ------------------------------------------------------------ lookups
    def profile(self, name: str) -> ModelProfile:
        return self.served[name].profile

    def footprint(self, name: str) -> int:
        return self.served[name].profile.weights_bytes + self.kv_bytes[name]

    # ------------------------------------------------------------ running
    def run(self, trace: Sequence[Arrival], until_s: float, score_from_s: float = 0.0,
            progress=None, place: bool = True) -> Results:
        """Serve ``trace`` until every request is done or ``until_s``;
        requests arriving before ``score_from_s`` are the warm-up. ``place``:
        the policy (or the static placement) places models; off, the caller
        has placed them."""
        self.results = Results(trace, {m: (s.ttft_slo_s, s.tpot_slo_s)
                                       for m, s in self.served.items()}, score_from_s)
        if place and self.policy is None:
            worker.place_statically(self)
        elif place:
            self.q.at(0.0, self._tick)
        if trace:
            self.q.at(trace[0].time_s, self._arrive, 0)
        left = [len(trace)]

        def done() -> bool:
            if progress is not None and self.q.processed % 4096 == 0:
                progress(self.q.now)
            return self.results.finished >= left[0]

        self.q.run(until_s, stop=done)
        self.results.close(self.q.now)
        return self.results

    def _arrive(self, i: int) -> None:
        trace = self.results.trace
        a = trace[i]
        if i + 1 < len(trace):
            self.q.at(trace[i + 1].time_s, self._arrive, i + 1)
        if a.model not in self.served:
            return  # not in the catalog: never served (counted as a miss)
        self.demand.observe(a.model, a.time_s)
        req = SimRequest(f"r{i}", a.model, a.time_s, a.output_tokens,
                         prompt_tokens=a.input_tokens, index=i)
        self.route(req)

    def route(self, req: SimRequest) -> None:
        """To the least busy ready copy of its model, else the cold queue."""
        ready = [e for e in self.copies[req.model] if e.ready]
        if ready:
            e = min(ready, key=lambda e: (e.inflight(req.model), e.id))
            e.arrive(req, self.q.now)
            return
        self.waiters[req.model].append(req)
        if self.policy is not None and not self._decide_pending:
            self._decide_pending = True
            self.q.at(max(self.q.now, self._last_decide + self.kick_gap_s), self._decide)

    def flush(self, model: str) -> None:
        """A copy of ``model`` became ready: its cold queue goes to it."""
        waiting, self.waiters[model] = self.waiters[model], deque()
        for req in waiting:
            self.route(req)

    def finished(self, req: SimRequest, engine: SimEngine, now: float) -> None:
        self.results.finish(req, now, engine.device.id)
        # The worker's smoothed latencies, as the live request stream keeps
        # them (cluster/engine/request_stream.py: _observe): from when the
        # request reached it. A request resumed here counts for neither (live
        # counts its TPOT from the resumed stream; not tracked here).
        key = (req.model, engine.device.id)
        ttft_old, tpot_old = self.latency.get(key, (None, None))
        n = req.generated - req.reached_with
        first = req.first_at if not req.reached_with else None
        ttft = ewma(ttft_old, first - req.reached_at) if first is not None else ttft_old
        tpot = tpot_old
        if n > 1 and not req.reached_with:
            tpot = ewma(tpot_old, (now - req.first_at) / (n - 1))
        self.latency[key] = (ttft, tpot)

    def new_engine_id(self) -> str:
        self._engine_ids += 1
        return f"e{self._engine_ids}"

    def make_engine(self, dev: SimDevice, model: str, ready_at: float) -> SimEngine:
        m = self.served[model]
        config = self.system.turns if dev.timeshare else None
        e = SimEngine(self, dev, self.new_engine_id(), m.profile.family, dev.cost,
                      config or worker.SINGLE, lambda name: (self.served[name].ttft_slo_s,
                                                             self.served[name].tpot_slo_s),
                      self.footprint(model), self.kv_bytes[model] // m.profile.kv_bytes_per_token,
                      ready_at, timeshared=config is not None)
        dev.engines.append(e)
        return e

    # ------------------------------------------------------------ controller
    def _tick(self) -> None:
        self._decide()
        if self.results.finished < len(self.results.trace):
            self.q.at(self.q.now + self.tick_s, self._tick)

    def _decide(self) -> None:
        self._decide_pending = False
        now = self._last_decide = self.q.now
        view = self.view(now)
        planned = view
        for a in self.policy.decide(view, now):
            try:
                planned = apply(planned, a)
            except InvalidAction as e:
                self.violations.append(f"t={now:.1f}s {e}")
                if self.strict:
                    raise SimulationError(f"policy {self.policy.name!r} at t={now:.1f}s: {e}") \
                        from None
                continue
            self.actions[type(a).__name__] += 1
            try:
                worker.carry_out(self, a, now)
            except worker.Refused as e:
                self.failures.append(f"t={now:.1f}s {type(a).__name__}: {e}")

    def _model_view(self, m: ServedModel, placements: tuple[Placement, ...]) -> ModelView:
        """``m``'s view; the last one again if its placements did not change
        (views are immutable, and most models are untouched between rounds)."""
        last = self._views.get(m.name)
        if last is not None and last.placements == placements:
            return last
        view = self._views[m.name] = ModelView(
            name=m.name, family=m.profile.family, weights_bytes=m.profile.weights_bytes,
            kv_cache_bytes=self.kv_bytes[m.name], ttft_slo_s=m.ttft_slo_s,
            tpot_slo_s=m.tpot_slo_s, allowed_vendors=m.allowed_vendors, placements=placements)
        return view

    def view(self, now: float) -> ClusterView:
        """What the policy sees, built as the live view builder builds it."""
        where: dict[str, list[Placement]] = {m: [] for m in self.served}
        inflight: dict[str, int] = dict.fromkeys(self.served, 0)
        for dev in self.devices.values():
            for e in dev.engines:
                for m in e.members:
                    busy = e.inflight(m)
                    inflight[m] += busy
                    if not e.ready:
                        state = LOADING
                    elif e.timeshared:
                        state = ACTIVE if e.resident == m else PARKED
                    else:
                        state = ACTIVE
                    ttft, tpot = self.latency.get((m, dev.id), (None, None))
                    # As live: a model is a time-share member once its engine is up.
                    where[m].append(Placement(dev.id, state, busy,
                                              timeshared=e.timeshared and state != LOADING,
                                              ttft_s=ttft, tpot_s=tpot))
            for m in dev.parked:
                where[m].append(Placement(dev.id, PARKED))
        models = tuple(self._model_view(m, tuple(where[m.name])) for m in self.served.values())
        demand = {m: self.demand.demand(m, now, len(self.waiters[m]), inflight[m])
                  for m in self.served}
        return ClusterView(devices=tuple(d.view for d in self.devices.values()), models=models,
                           demand=demand)
