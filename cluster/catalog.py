"""The model catalog: the one user-facing config schema for models and devices.

Operators edit ``ray_configs/models.yaml``; it is validated here at load time,
and a bad file fails with the offending field named (pydantic's error path,
e.g. ``models.2.slo.ttft_s``). Internal code passes these objects around
read-only; the policies get plain dataclass views built from them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer,
                      field_validator, model_validator)


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the field."""


class _Strict(BaseModel):
    # Unknown keys are typos in operator-edited YAML: refuse them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SLO(_Strict):
    ttft_s: float = Field(10.0, gt=0, description="time-to-first-token target")
    tpot_s: float = Field(0.1, gt=0, description="time-per-output-token target")


class ModelSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    path: str = Field(min_length=1, description="local HF checkpoint directory")
    # Models of one family share shapes and tokenizer, so the engine worker
    # can swap one into another's engine in place (verified before swapping).
    family: str = Field(min_length=1)
    param_count: int = Field(0, ge=0, description="0 = read from the checkpoint")
    weights_bytes: int = Field(0, ge=0, description="0 = size of the safetensors files")
    # KV-cache memory this model reserves on a device while resident.
    kv_cache_bytes: int = Field(256 * 2**20, gt=0)
    max_model_len: int = Field(512, gt=0)
    engine_args: dict[str, Any] = Field(default_factory=dict)
    slo: SLO = Field(default_factory=SLO)
    # Empty = any. Vendor names are lowercase ("nvidia", "amd", "huawei",
    # "intel", "cpu"); accelerator types use Ray's strings ("H100", ...).
    allowed_vendors: list[str] = Field(default_factory=list)
    allowed_accelerators: list[str] = Field(default_factory=list)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=1)
    pinned: bool = Field(False, description="never evicted or migrated by policy")
    # How long a request waits for this model to load; None = the
    # controller's load_timeout_s (big models take longer than small ones).
    load_timeout_s: float | None = Field(None, gt=0)

    @field_validator("allowed_vendors")
    @classmethod
    def _lower_vendors(cls, v: list[str]) -> list[str]:
        return [x.lower() for x in v]

    @model_validator(mode="after")
    def _replicas_ordered(self) -> "ModelSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    def resolved(self, base_dir: Path | None = None) -> "ModelSpec":
        """Fill the sizes from the checkpoint on disk (weights, params)."""
        path = Path(self.path)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        update: dict[str, Any] = {"path": str(path)}
        if self.weights_bytes == 0 and path.is_dir():
            update["weights_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        if self.param_count == 0 and (path / "config.json").exists():
            update["param_count"] = _param_count_from_safetensors(path)
        return self.model_copy(update=update)


class TimeshareConfig(_Strict):
    """Token-level time-sharing of one device by the models of one family
    (``cluster/engine/timeshare.py``). Set on a device to turn it on there."""

    # "token": preempted between decode steps when another model's requests
    # run out of SLO slack (policies/slack.py); "aegaeon": Aegaeon's fixed
    # decode quotas (policies/quota.py); "request": a model keeps the device
    # until its requests are done (no preemption).
    discipline: Literal["token", "aegaeon", "request"] = "token"
    # Aegaeon's alpha floor: quotas aim each model's average TPOT at this
    # fraction of its SLO; higher = longer turns, fewer switches.
    slo_fraction: float = Field(0.5, gt=0, le=1)
    # Aegaeon's 4 s bound on a turn; "token" serves a model whose oldest
    # request has waited this long even when that request is already late.
    max_round_s: float = Field(4.0, gt=0)
    min_quota_s: float = Field(0.01, gt=0,
                               description="shortest turn; how often turns are re-judged")
    default_step_s: float = Field(0.02, gt=0, description="decode step assumed until measured")

    @model_validator(mode="after")
    def _quota_bounds(self) -> "TimeshareConfig":
        if self.min_quota_s > self.max_round_s:
            raise ValueError(f"min_quota_s ({self.min_quota_s}) > max_round_s ({self.max_round_s})")
        return self


class CPUDevice(_Strict):
    """A CPU "device": a declared slice of host memory that engines may use."""

    id: str = Field(min_length=1)
    memory_bytes: int = Field(gt=0)
    # Which Ray node runs its engines: a node id, a node IP, or the name of a
    # custom resource that node declares (``ray start --resources
    # '{"shoal-node-b": 1}'``). None = the head node.
    node: str | None = None
    vendor: str = "cpu"
    accelerator_type: str | None = None
    speed: float = Field(1.0, gt=0, description="relative decode throughput")
    cost_per_hour: float = Field(0.0, ge=0)
    timeshare: TimeshareConfig | None = None


class AcceleratorProfile(_Strict):
    """What Ray's resources do not say about one accelerator type."""

    memory_bytes: int = Field(gt=0)
    speed: float = Field(1.0, gt=0)
    cost_per_hour: float = Field(0.0, ge=0)
    timeshare: TimeshareConfig | None = None


class DiscoveryConfig(_Strict):
    """How the controller turns Ray cluster resources into devices."""

    # Per ``accelerator_type:*`` string; unknown types use the default memory.
    accelerators: dict[str, AcceleratorProfile] = Field(default_factory=dict)
    default_accelerator_memory_bytes: int = Field(16 * 2**30, gt=0)
    # Run the engines of discovered accelerators on CPU. For tests and demos
    # on machines without accelerators: the nodes declare GPU/NPU resources
    # and accelerator types, placement sees them, engines are vLLM-on-CPU.
    emulate_accelerators_on_cpu: bool = False


class ElasticAccelerator(_Strict):
    """One accelerator type the autoscaler can add (a node type provides it)."""

    # The most devices of this type the standing request asks for: the node
    # type's max_workers times its devices per node.
    max_devices: int = Field(8, ge=1)


class CapacityConfig(_Strict):
    """Elastic capacity through Ray's autoscaler (``policies/elastic.py``).
    Without this section Shoal asks Ray for nothing and gives nothing back."""

    # Types the autoscaler can add; each needs a discovery.accelerators profile
    # (memory, speed, cost: how the request picks a type for a model).
    accelerators: dict[str, ElasticAccelerator] = Field(default_factory=dict)
    shrink_delay_s: float = Field(30.0, ge=0, description="request shrink hysteresis")
    release_idle_s: float = Field(60.0, ge=0, description="empty this long: give it back")
    min_node_lifetime_s: float = Field(300.0, ge=0, description="no scale-down before this age")
    # The node label each bundle's label selector names (autoscaler v2). The
    # node types must carry it (custom labels cannot start with "ray.io/";
    # use "ray.io/accelerator-type" only where Ray detects the hardware).
    # None: select by the accelerator_type resource alone.
    label_key: str | None = "shoal.io/accelerator-type"


class ControllerConfig(_Strict):
    policy: str = Field("default", description="default | dedicated | lru")
    policy_config: dict[str, Any] = Field(default_factory=dict)
    tick_s: float = Field(2.0, ge=0, description="policy timer; 0 = on events only")
    health_check_s: float = Field(2.0, gt=0)
    # Cold start: requests for a model that is not active wait here.
    cold_queue_max: int = Field(64, ge=1, description="waiting requests per model")
    load_timeout_s: float = Field(180.0, gt=0)
    # How fast a model's measured arrival rate forgets (policies/demand.py):
    # shorter follows bursts and lulls sooner, and scales in sooner.
    demand_half_life_s: float = Field(60.0, gt=0)


class TenantSpec(_Strict):
    """One API client of the front door (``serve_apps/tenants.py``): its
    key, the models it may see, and its limits. Exactly one of ``key_env``,
    ``key`` or ``anonymous`` says how its requests are recognised."""

    # The name of an environment variable holding the key, read where the
    # front door runs: no key needs to be in a file checked into git.
    key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # The key itself (tests, throwaway setups). Masked in repr; dumps keep it
    # because the Serve app receives its catalog as a dump.
    key: SecretStr | None = None
    # Requests that carry no Authorization header at all are this tenant's
    # (at most one tenant). A request with a wrong key is still refused.
    anonymous: bool = False
    # The models this tenant may use; empty = every catalog model. Others do
    # not exist for it: 404, and /v1/models leaves them out.
    models: list[str] = Field(default_factory=list)
    requests_per_minute: int | None = Field(None, gt=0)
    # Prompt + completion tokens per minute, counted as requests finish: a
    # request that takes the window over budget finishes, the next waits.
    tokens_per_minute: int | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, gt=0, description="requests in flight at once")

    @field_serializer("key", when_used="always")
    def _dump_key(self, key: SecretStr | None) -> str | None:
        return key.get_secret_value() if key is not None else None

    @model_validator(mode="after")
    def _one_way_in(self) -> "TenantSpec":
        ways = [w for w, on in (("key_env", self.key_env is not None),
                                ("key", self.key is not None),
                                ("anonymous", self.anonymous)) if on]
        if len(ways) != 1:
            raise ValueError(f"give exactly one of key_env, key or anonymous: true "
                             f"(got {', '.join(ways) or 'none'})")
        if self.key is not None and not self.key.get_secret_value().strip():
            raise ValueError("key is empty")
        return self

    def resolve_key(self, name: str, environ: Mapping[str, str] = os.environ) -> str | None:
        """The tenant's key (None: the anonymous tenant). Raises CatalogError
        naming the field when ``key_env`` names an unset or empty variable."""
        if self.key is not None:
            return self.key.get_secret_value()
        if self.key_env is None:
            return None
        value = environ.get(self.key_env, "").strip()
        if not value:
            raise CatalogError(f"tenants.{name}.key_env: environment variable "
                               f"{self.key_env} is not set (or empty) where the front door runs")
        return value


TENANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # a metrics label and a log field


class Catalog(_Strict):
    models: list[ModelSpec] = Field(default_factory=list)
    cpu_devices: list[CPUDevice] = Field(default_factory=list)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    capacity: CapacityConfig | None = None
    # API clients by name. Empty: no keys, no tenant limits (every request
    # is served as before). Otherwise every request needs a tenant's key,
    # or falls to the ``anonymous`` tenant when it carries none.
    tenants: dict[str, TenantSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_names(self) -> "Catalog":
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate model name(s): {dup}")
        ids = [d.id for d in self.cpu_devices]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate cpu_devices id(s): {dup}")
        for t in self.capacity.accelerators if self.capacity else ():
            if t not in self.discovery.accelerators:
                raise ValueError(f"capacity.accelerators.{t}: no profile in "
                                 f"discovery.accelerators (memory_bytes, speed, cost_per_hour)")
        self._check_tenants(set(names))
        return self

    def _check_tenants(self, models: set[str]) -> None:
        import re

        for name, t in self.tenants.items():
            if not re.match(TENANT_NAME, name):
                raise ValueError(f"tenants.{name}: a tenant name is letters, digits, '.', "
                                 f"'_' and '-', starting with a letter or digit")
            for i, m in enumerate(t.models):
                if m not in models:
                    raise ValueError(f"tenants.{name}.models.{i}: unknown model {m!r}")
        anonymous = sorted(n for n, t in self.tenants.items() if t.anonymous)
        if len(anonymous) > 1:
            raise ValueError(f"tenants: only one tenant may be anonymous (got {anonymous})")
        keys = [t.key.get_secret_value() for t in self.tenants.values() if t.key is not None]
        envs = [t.key_env for t in self.tenants.values() if t.key_env is not None]
        if len(set(keys)) < len(keys) or len(set(envs)) < len(envs):
            raise ValueError("tenants: two tenants share a key (or a key_env)")

    def without_tenants(self) -> "Catalog":
        """This catalog with no tenant keys: for the parts that never need
        them (the controller), so keys are held where they are checked only."""
        return self.model_copy(update={"tenants": {}})

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def _param_count_from_safetensors(path: Path) -> int:
    """Count parameters from safetensors headers without loading tensors;
    0 for a file that is not safetensors (the app builder's checkpoint
    checks name it: ``cluster/engine/catalog_checks.py``)."""
    total = 0
    try:
        for f in sorted(path.glob("*.safetensors")):
            with f.open("rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                if not 0 < header_len <= 100 * 2**20:  # the format's own bound
                    return 0
                header = json.loads(fh.read(header_len))
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                n = 1
                for d in meta["shape"]:
                    n *= int(d)
                total += n
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0
    return total


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid catalog {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def load_catalog(source: str | Path | dict) -> Catalog:
    """Load and validate a catalog from a YAML path or a dict.

    Relative model paths resolve against the YAML file's directory.
    Raises CatalogError naming every bad field.
    """
    base: Path | None = None
    if isinstance(source, dict):
        raw, where = source, "<dict>"
    else:
        p = Path(source)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise CatalogError(f"cannot read catalog {p}: {e}") from e
        # Absolute: engine workers run with another working directory.
        base, where = p.parent.resolve(), str(p)
    try:
        cat = Catalog.model_validate(raw)
    except ValidationError as e:
        raise CatalogError(format_validation_error(e, where)) from None
    return cat.model_copy(update={"models": [m.resolved(base) for m in cat.models]})
