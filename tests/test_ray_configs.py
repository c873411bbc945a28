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
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} >= {"models.yaml", "serve.yaml", "rayservice.yaml",
                                       *CLUSTER_FILES}
    for f in files:
        text = f.read_text()
        header = text.split("\n", 3)[:3]
        assert all(line.startswith("#") for line in header), f"{f.name}: no comment header"
        assert list(yaml.safe_load_all(text)), f.name


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
