"""The front door's Prometheus output (``serve_apps/metrics.py``) from a
hand-built controller snapshot, without Ray: tenant and time-share series
are exported, and so is every metric the shipped Grafana dashboard charts.
(``tests/test_front_door.py`` checks the dashboard against a live scrape.)"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from serve_apps.metrics import FrontDoorMetrics
from tests.helpers import exported_metric_names
from tests.test_ray_configs import dashboard_metric_names

SNAPSHOT = {
    "queue": {"m": 1},
    "actions": {"m|swap": 3, "m|load": 1},
    "swap_seconds": {"buckets": [(0.1, 2), (float("inf"), 3)], "sum": 0.4},
    "devices": [{"id": "gpu-0", "memory_used_bytes": 5, "memory_budget_bytes": 10}],
    "timeshare": {"gpu-0": {"switches": 7, "preemptions": 2}},
}


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_tenant_usage_and_time_share_switches_are_exported():
    m = FrontDoorMetrics()
    m.tenant_done("team-a", 200, 11, 5)
    m.tenant_done("team-a", 429, 0, 0)
    got = samples(m.render(SNAPSHOT).decode())
    assert got[("shoal_tenant_tokens_total", (("direction", "in"), ("tenant", "team-a")))] == 11
    assert got[("shoal_tenant_tokens_total", (("direction", "out"), ("tenant", "team-a")))] == 5
    assert got[("shoal_tenant_requests_total", (("status", "429"), ("tenant", "team-a")))] == 1
    assert got[("shoal_timeshare_switches_total", (("device", "gpu-0"),))] == 7
    assert got[("shoal_timeshare_preemptions_total", (("device", "gpu-0"),))] == 2


def test_every_dashboard_metric_is_exported_by_the_front_door():
    m = FrontDoorMetrics()
    m.request_done("m", 200, 0.0, [0.1, 0.2])
    missing = dashboard_metric_names() - exported_metric_names(m.render(SNAPSHOT).decode())
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"
