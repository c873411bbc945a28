"""Prometheus metrics for the front door (prometheus-client text format).

Latency is measured here, where the client's experience is: TTFT to the
first streamed chunk, TPOT between chunks, end to end. Control-plane
numbers (queue depth, loads, swaps, migrations, evictions, swap latency,
device memory, time-share switches) come from the controller's
``metrics()`` snapshot at scrape time, through a custom collector, so every
front-door replica reports the same cluster-wide values.

Per-tenant counters are labelled with the tenant's NAME, never its key.
``ray_configs/grafana-shoal.json`` charts these metrics; a test checks that
every name it queries is exported here.
"""

from __future__ import annotations


from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class FrontDoorMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self._snapshot: dict = {}
        r = self.registry
        self.ttft = Histogram("shoal_ttft_seconds", "time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("shoal_tpot_seconds", "time per output token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("shoal_e2e_seconds", "request latency, end to end", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("shoal_requests", "requests by outcome", ["model", "status"],
                                registry=r)
        self.slo_misses = Counter("shoal_slo_misses", "requests over their TTFT or TPOT SLO",
                                  ["model", "slo"], registry=r)
        self.resumes = Counter("shoal_request_resumes", "requests continued on another copy "
                               "mid-generation (cause: moved by an evacuation, or failed: its "
                               "worker died)", ["model", "cause"], registry=r)
        self.tenant_requests = Counter("shoal_tenant_requests", "requests by tenant and outcome",
                                       ["tenant", "status"], registry=r)
        self.tenant_tokens = Counter("shoal_tenant_tokens", "tokens by tenant: in = prompt, "
                                     "out = completion", ["tenant", "direction"], registry=r)
        r.register(_ControllerCollector(self))

    def tenant_done(self, tenant: str, status: int, prompt_tokens: int,
                    completion_tokens: int) -> None:
        self.tenant_requests.labels(tenant, str(status)).inc()
        if prompt_tokens:
            self.tenant_tokens.labels(tenant, "in").inc(prompt_tokens)
        if completion_tokens:
            self.tenant_tokens.labels(tenant, "out").inc(completion_tokens)

    def request_done(self, model: str, status: int, t0: float, stamps: list[float],
                     slo=None) -> None:
        self.requests.labels(model, str(status)).inc()
        if not stamps:
            return
        end = stamps[-1]
        self.e2e.labels(model).observe(end - t0)
        ttft = stamps[0] - t0
        self.ttft.labels(model).observe(ttft)
        tpot = (end - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
        if tpot is not None:
            self.tpot.labels(model).observe(tpot)
        if slo is not None:
            if ttft > slo.ttft_s:
                self.slo_misses.labels(model, "ttft").inc()
            if tpot is not None and tpot > slo.tpot_s:
                self.slo_misses.labels(model, "tpot").inc()

    def request_resumed(self, model: str, cause: str) -> None:
        self.resumes.labels(model, cause).inc()

    def request_failed(self, model: str, err: Exception) -> None:
        self.requests.labels(model, str(getattr(err, "status", 500))).inc()

    def render(self, snapshot: dict) -> bytes:
        self._snapshot = snapshot
        return generate_latest(self.registry)


class _ControllerCollector:
    """Cluster-wide values from the latest controller snapshot."""

    def __init__(self, owner: FrontDoorMetrics):
        self.owner = owner

    def collect(self):
        s = self.owner._snapshot
        if not s:
            return
        queue = GaugeMetricFamily("shoal_queue_depth", "requests waiting for a cold model",
                                  labels=["model"])
        for model, n in sorted(s["queue"].items()):
            queue.add_metric([model], n)
        yield queue
        actions = CounterMetricFamily("shoal_control_actions", "executed placement actions "
                                      "(load, swap, migrate, evict, ...)", labels=["model", "action"])
        for key, n in sorted(s["actions"].items()):
            model, action = key.split("|", 1)
            actions.add_metric([model, action], n)
        yield actions
        h = s["swap_seconds"]
        swaps = HistogramMetricFamily("shoal_swap_seconds", "in-place weight swap latency")
        swaps.add_metric([], [("+Inf" if b == float("inf") else str(b), c)
                              for b, c in h["buckets"]], h["sum"])
        yield swaps
        used = GaugeMetricFamily("shoal_device_memory_used_bytes", "device memory reserved",
                                 labels=["device"])
        budget = GaugeMetricFamily("shoal_device_memory_budget_bytes", "device memory budget",
                                   labels=["device"])
        for d in s["devices"]:
            used.add_metric([d["id"]], d["memory_used_bytes"] or 0)
            budget.add_metric([d["id"]], d["memory_budget_bytes"])
        yield used
        yield budget
        switches = CounterMetricFamily("shoal_timeshare_switches", "weight switches between "
                                       "the models time-sharing a device", labels=["device"])
        preempted = CounterMetricFamily("shoal_timeshare_preemptions", "engine requests "
                                        "preempted at the end of a turn", labels=["device"])
        for device, t in sorted(s.get("timeshare", {}).items()):
            switches.add_metric([device], t["switches"])
            preempted.add_metric([device], t["preemptions"])
        yield switches
        yield preempted


