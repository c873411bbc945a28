"""Device and model profiles: what the simulator knows of hardware and models.

Profiles live in JSON files users may edit (``cluster/sim/data/devices.json``,
``models.json``, or a file ``shoal profile`` wrote), so they are validated
on load and a bad file fails naming the field, e.g.
``devices.2.memory_bytes: Input should be greater than 0``. Inside the
simulator they are frozen dataclasses.

A device is either a datasheet profile (peak bandwidth and FLOP/s, which
the roofline cost model derates) or a measured one (``measured`` set: step
and prefill times taken on a real engine, used as they are). A tensor-parallel
group of n devices is itself a device (``tp_group``): n times the memory,
bandwidth, FLOP/s, host links and cost, counted as n devices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

Positive = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
_STRICT = ConfigDict(extra="forbid")


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the field."""


@dataclass(frozen=True)
class MeasuredEngine:
    """Times measured on one real engine for one model (``shoal profile``)."""

    __pydantic_config__ = _STRICT

    model: str  # the checkpoint measured
    weights_bytes: PositiveInt
    # Prefill of n tokens (one request, or a re-prefill): fixed_s + per_token_s * n.
    prefill_fixed_s: Annotated[float, Field(ge=0)]
    prefill_per_token_s: Annotated[float, Field(ge=0)]
    # One decode step of a batch of b requests, seconds; interpolated between batches.
    decode_step_s_by_batch: dict[int, Positive]
    swap_s: Annotated[float, Field(ge=0)]  # in-place weight swap (prepared path on CPU)
    fresh_engine_s: Annotated[float, Field(ge=0)]  # a new engine for the model
    kv_bytes_per_token: PositiveInt = 1
    # Anything else worth keeping: the machine, the date, raw samples.
    notes: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceProfile:
    __pydantic_config__ = _STRICT

    name: str
    vendor: str  # "nvidia", "amd", "huawei", "intel", "cpu" (policies' vendor names)
    accelerator_type: str | None  # Ray's string; None for a CPU
    memory_bytes: PositiveInt
    memory_bandwidth_bytes_per_s: Positive  # datasheet peak
    dense_flops_per_s: Positive  # datasheet dense bf16/fp16 peak
    host_link_bytes_per_s: Positive  # effective host-to-device copy rate
    cost_per_hour: Annotated[float, Field(ge=0)]
    aliases: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)  # figure -> where it comes from
    devices: PositiveInt = 1  # physical devices it stands for (a tensor-parallel group: n)
    measured: MeasuredEngine | None = None


@dataclass(frozen=True)
class ModelProfile:
    __pydantic_config__ = _STRICT

    name: str
    family: str  # same family = same shapes: swappable in place, one time-share group
    params: Positive
    weights_bytes: PositiveInt
    layers: PositiveInt
    hidden_size: PositiveInt
    kv_bytes_per_token: PositiveInt
    tensor_parallel: PositiveInt = 1
    sources: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _DeviceFile:
    __pydantic_config__ = _STRICT
    devices: list[DeviceProfile]
    comment: str = ""


@dataclass(frozen=True)
class _ModelFile:
    __pydantic_config__ = _STRICT
    models: list[ModelProfile]
    comment: str = ""


def _read(path: Path | None, default: str, schema: type):
    if path is None:
        text, where = resources.files("cluster.sim").joinpath("data", default).read_text(), default
    else:
        text, where = Path(path).read_text(), str(path)
    try:
        return TypeAdapter(schema).validate_python(json.loads(text))
    except json.JSONDecodeError as e:
        raise ProfileError(f"{where}: not JSON: {e}") from None
    except ValidationError as e:
        lines = [f"invalid profile file {where}:"]
        lines += [f"  {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                  for err in e.errors()]
        raise ProfileError("\n".join(lines)) from None


def load_devices(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Device profiles by name and alias (default: the shipped datasheet file)."""
    out: dict[str, DeviceProfile] = {}
    for d in _read(path, "devices.json", _DeviceFile).devices:
        for key in (d.name, *d.aliases):
            out[key] = d
    return out


def load_models(path: str | Path | None = None) -> dict[str, ModelProfile]:
    return {m.name: m for m in _read(path, "models.json", _ModelFile).models}


def load_device_file(path: str | Path) -> DeviceProfile:
    """One device from a file holding exactly one (what ``shoal profile`` writes)."""
    devices = _read(Path(path), "", _DeviceFile).devices
    if len(devices) != 1:
        raise ProfileError(f"{path}: expected one device, found {len(devices)}")
    return devices[0]


def device_file_json(device: DeviceProfile, comment: str) -> str:
    """The JSON ``load_device_file`` reads back."""
    data = TypeAdapter(_DeviceFile).dump_python(_DeviceFile([device], comment), mode="json")
    return json.dumps(data, indent=2)


def tp_group(device: DeviceProfile, n: int) -> DeviceProfile:
    """n devices serving one tensor-parallel engine, as one device. The
    all-reduce cost is the cost model's (``TP_EFFICIENCY``), not the profile's."""
    if n == 1:
        return device
    return replace(device, name=f"{device.name}x{n}", aliases=(),
                   memory_bytes=device.memory_bytes * n,
                   memory_bandwidth_bytes_per_s=device.memory_bandwidth_bytes_per_s * n,
                   dense_flops_per_s=device.dense_flops_per_s * n,
                   host_link_bytes_per_s=device.host_link_bytes_per_s * n,
                   cost_per_hour=device.cost_per_hour * n, devices=device.devices * n)


def alias(model: ModelProfile, name: str) -> ModelProfile:
    """Another model of the same architecture and size (a fine-tune): Aegaeon
    aliases three base models to up to 80 served models this way."""
    return replace(model, name=name)
