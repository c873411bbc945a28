"""Every shipped file in ray_configs/ loads and agrees with the catalog.

Cluster-launcher configs validate against Ray's own
``ray/autoscaler/ray-schema.json``; the KubeRay manifest goes through Ray's
own KubeRay code (what its autoscaler derives from the RayCluster spec,
schema-checked by Ray); Serve configs through Serve's schema. Every
accelerator a config provides has a catalog profile, is counted in the
Ray resource Shoal claims for it (GPU, NPU or HPU) and carries the label
that Shoal's capacity requests select on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from cluster.catalog import load_catalog
from cluster.control.discovery import device_resource

CONFIGS = Path(__file__).resolve().parents[1] / "ray_configs"
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
LABEL = "shoal.io/accelerator-type"
CLUSTER_FILES = ["cluster-onprem.yaml", "cluster-aws.yaml", "autoscale-fake.yaml"]


def load(name: str):
    return yaml.safe_load((CONFIGS / name).read_text())


def profiles() -> dict:
    return load_catalog(CONFIGS / "models.yaml").discovery.accelerators


def test_every_shipped_file_opens_with_a_comment_header_and_parses():
    """YAML opens with comment lines; JSON, which has no comments, with a
    ``description`` field saying what the file is and how to use it."""
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} >= {"models.yaml", "serve.yaml", "rayservice.yaml",
                                       *CLUSTER_FILES}
    for f in files:
        text = f.read_text()
        header = text.split("\n", 3)[:3]
        assert all(line.startswith("#") for line in header), f"{f.name}: no comment header"
        assert list(yaml.safe_load_all(text)), f.name
    jsons = sorted(CONFIGS.glob("*.json"))
    assert {f.name for f in jsons} >= {DASHBOARD.name}
    for f in jsons:
        doc = json.loads(f.read_text())
        first = next(iter(doc))
        assert first == "description" and len(doc[first]) > 80, f"{f.name}: no description header"
    assert "Import" in json.loads(DASHBOARD.read_text())["description"]


# ------------------------------------------------------- the Grafana dashboard
DASHBOARD = CONFIGS / "grafana-shoal.json"
# PromQL words that are not metric names (functions are followed by "(").
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "offset", "bool", "inf", "nan"}
# What the dashboard must chart: a name for the failure, and a test on one query.
REQUIRED_PANELS = {
    "per-model request rate": lambda e: "rate(shoal_requests_total" in e and "by (model)" in e,
    "TTFT percentiles": lambda e: "histogram_quantile" in e and "shoal_ttft_seconds_bucket" in e,
    "TPOT percentiles": lambda e: "histogram_quantile" in e and "shoal_tpot_seconds_bucket" in e,
    "queue depth": lambda e: "shoal_queue_depth" in e,
    "swaps per second": lambda e: "rate(shoal_control_actions_total" in e and 'action="swap"' in e,
    "time-share switches per second": lambda e: "rate(shoal_timeshare_switches_total" in e,
    "device memory": lambda e: "shoal_device_memory_used_bytes" in e,
    "per-tenant usage": lambda e: "shoal_tenant_tokens_total" in e and "tenant" in e,
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not
    functions, keywords, label names (inside ``{}``, ``by (...)`` and the
    like), strings, durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges: [5m], [$__rate_interval]
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    # Grafana's label_values(metric, label): the label is no metric
    expr = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r"(\1)", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target and query variable."""
    doc = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", q))
    return out


def dashboard_metric_names() -> set[str]:
    return {n for _, e in dashboard_queries() for n in promql_metric_names(e)}


def test_promql_metric_names_skip_functions_labels_and_variables():
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(shoal_ttft_seconds_bucket'
            '{model=~"$model", status!="200"}[$__rate_interval]))) / on (model) shoal_x')
    assert promql_metric_names(expr) == {"shoal_ttft_seconds_bucket", "shoal_x"}
    assert promql_metric_names("label_values(shoal_requests_total, model)") == {
        "shoal_requests_total"}
    assert promql_metric_names("sum(up) and bool 1") == {"up"}


def test_grafana_dashboard_is_importable_and_charts_every_required_kind():
    doc = json.loads(DASHBOARD.read_text())
    ds = [v for v in doc["templating"]["list"] if v["type"] == "datasource"]
    assert ds and ds[0]["query"] == "prometheus"  # a Prometheus data source variable
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])  # ids unique
    for p in panels:
        assert p["datasource"]["uid"] == "${" + ds[0]["name"] + "}", p["title"]
        assert p["targets"] and all(promql_metric_names(t["expr"]) for t in p["targets"]), \
            f"{p['title']}: a query that reads no metric"
    exprs = [e for _, e in dashboard_queries()]
    missing = [kind for kind, has in REQUIRED_PANELS.items() if not any(has(e) for e in exprs)]
    assert not missing, f"the dashboard lacks: {missing}"
    assert all(n.startswith("shoal_") for n in dashboard_metric_names())


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_configs_validate_against_rays_schema(name):
    jsonschema.validate(load(name), SCHEMA)


def accelerator_types(resources: dict) -> list[str]:
    return [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]


def check_node_type(name: str, resources: dict, labels: dict, known: dict) -> str | None:
    """One node type against the catalog; returns its accelerator type."""
    types = accelerator_types(resources)
    if not types:
        assert not {"GPU", "NPU", "HPU"} & {k for k, v in resources.items() if float(v) > 0}, \
            f"{name}: devices without an accelerator_type"
        return None
    (t,) = types
    assert t in known, f"{name}: accelerator type {t!r} has no catalog profile"
    assert float(resources.get(device_resource(t), 0)) >= 1, \
        f"{name}: {t} devices must be counted in {device_resource(t)}"
    assert labels.get(LABEL) == t, f"{name}: label {LABEL} must be {t!r}"
    return t


@pytest.mark.parametrize("name", ["cluster-aws.yaml", "autoscale-fake.yaml"])
def test_node_types_agree_with_the_catalog(name):
    known = profiles()
    seen = {check_node_type(n, t["resources"], t.get("labels", {}), known)
            for n, t in load(name)["available_node_types"].items()}
    assert len(seen - {None}) >= 2  # mixed: several accelerator types


def test_onprem_machine_rules_agree_with_the_catalog():
    """The local provider has one node type; the machine types are rules in
    the worker start command: each sets the label, Ascend declares NPU."""
    cfg = load("cluster-onprem.yaml")
    assert cfg["provider"]["type"] == "local" and "available_node_types" not in cfg
    start = " ".join(cfg["worker_start_ray_commands"])
    rules = {ip: t for ip, t, _ in re.findall(r"(10\.0\.\d+)\.\*\) T=([\w-]+); R='([^']*)'", start)}
    types = set(rules.values()) | set(re.findall(r"\*\) T=([\w-]+);", start))
    assert types == {"H100", "H20", "AMD-Instinct-MI300X-OAM", "Ascend910B", "CPU"}
    known = profiles()
    assert all(t in known for t in types - {"CPU"})
    (ascend,) = re.findall(r"T=Ascend910B; R='([^']*)'", start)
    assert json.loads(ascend) == {"NPU": 8, "accelerator_type:Ascend910B": 1}
    assert f'--labels="{LABEL}=$T"' in start
    for ip in cfg["provider"]["worker_ips"]:  # every machine falls under a rule
        assert any(ip.startswith(prefix + ".") for prefix in rules) or ip.startswith("10.0.5.")


def test_fake_config_provider_is_rays_fake_multinode_provider():
    from ray.autoscaler._private.providers import _get_node_provider_cls

    cfg = load("autoscale-fake.yaml")
    cls = _get_node_provider_cls(cfg["provider"])
    assert cls.__name__ == "FakeMultiNodeProvider"


def rayservice() -> dict:
    (doc,) = yaml.safe_load_all((CONFIGS / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    return doc


def test_rayservice_serve_config_runs_shoals_app_with_a_valid_catalog():
    from ray.serve.schema import ServeDeploySchema

    serve = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)
    (app,) = serve["applications"]
    assert app["import_path"] == "serve_apps.app:build_app"
    cat = load_catalog(app["args"]["catalog"])
    assert cat.capacity is not None and cat.capacity.label_key == LABEL


def test_rayservice_groups_as_rays_autoscaler_sees_them_agree_with_the_catalog():
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr)

    doc = rayservice()
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    cat = load_catalog(serve["applications"][0]["args"]["catalog"])
    cr = {"metadata": doc["metadata"], "spec": doc["spec"]["rayClusterConfig"]}
    auto = _derive_autoscaling_config_from_ray_cr(cr)  # Ray validates it against its schema
    jsonschema.validate(auto, SCHEMA)
    groups = {g["groupName"]: g for g in cr["spec"]["workerGroupSpecs"]}
    seen = {}
    for name, node_type in auto["available_node_types"].items():
        t = check_node_type(name, node_type["resources"], node_type["labels"],
                            cat.discovery.accelerators)
        if t is None:
            continue
        per_pod = node_type["resources"][device_resource(t)]
        assert cat.capacity.accelerators[t].max_devices == \
            groups[name]["maxReplicas"] * per_pod, f"{name}: max_devices"
        limits = groups[name]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert per_pod in {int(v) for k, v in limits.items() if "/" in k}, \
            f"{name}: the pod's device limit must match its {device_resource(t)} count"
        seen[t] = name
    assert set(seen) == set(cat.capacity.accelerators) == \
        {"H100", "H20", "AMD-Instinct-MI300X-OAM", "Ascend910B"}


def test_serve_yaml_validates():
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(load("serve.yaml"))
