"""``shoal status`` with a big catalog: counts per device, a filterable model
table, and a model's state that never contradicts its placements."""

from __future__ import annotations

from cluster.catalog import ModelSpec
from cluster.control.status import device_status, model_status
from cluster.engine.contract import DeviceStats, ModelState, ModelStatus, WorkerStats
from cluster.engine.device import DeviceSpec
from cluster.ops.status_table import status_table
from policies.view import Demand

N = 60


def copy(name: str, state: ModelState, in_engine: bool = False,
         draining: bool = False) -> ModelStatus:
    routable = state in (ModelState.ACTIVE, ModelState.TIMESHARED) and not draining
    return ModelStatus(name=name, family="llama", state=state, routable=routable,
                       in_engine=in_engine, draining=draining, shell="shell0", architecture="X",
                       weights_bytes=1, kv_cache_bytes=1, running=0, waiting=0,
                       tokens_per_s=0.0, last_swap_s=None)


def big_status() -> dict:
    """60 models time-sharing cpu0 (one in the engine), one parked on cpu1,
    one draining on cpu1, and one cold."""
    names = [f"tiny-{i:02d}" for i in range(N)]
    cpu0 = {n: copy(n, ModelState.TIMESHARED, in_engine=(n == names[0])) for n in names}
    cpu1 = {"extra-parked": copy("extra-parked", ModelState.PARKED),
            "extra-draining": copy("extra-draining", ModelState.ACTIVE, draining=True)}
    stats = {d: WorkerStats(DeviceStats(d, "cpu", "cpu", None, 100, 200, 0, False), {}, ms, {},
                            0.0) for d, ms in (("cpu0", cpu0), ("cpu1", cpu1))}
    specs = [ModelSpec(name=n, path=f"/m/{n}", family="llama")
             for n in names + ["extra-parked", "extra-draining", "extra-cold"]]
    models = []
    for spec in specs:
        copies = {d: s.models[spec.name] for d, s in stats.items() if spec.name in s.models}
        models.append(model_status(spec, copies, sum(c.routable for c in copies.values()),
                                   Demand(), None))
    devices = [device_status(DeviceSpec(d, "cpu", 200), stats[d]) for d in sorted(stats)]
    return {"policy": "default", "version": 7, "devices": devices, "models": models}


def test_devices_show_counts_not_names():
    text = status_table(big_status(), show_models=False)
    cpu0 = next(line for line in text.splitlines() if line.startswith("cpu0"))
    assert "60 (60 timeshared)" in cpu0 and "tiny-" not in cpu0
    assert max(len(line) for line in text.splitlines()) < 120
    assert "63 models: 60 active, 1 cold, 2 parked" in text


def test_states_and_placements_never_contradict():
    for m in big_status()["models"]:
        serving = [s for s in m["devices"].values() if s in ("active", "timeshared")]
        if m["state"] == "active":
            assert serving, m
        if m["state"] == "cold":
            assert not m["devices"], m
    by_name = {m["name"]: m for m in big_status()["models"]}
    assert by_name["tiny-05"]["state"] == "active"  # a member serves while parked
    assert by_name["tiny-05"]["devices"] == {"cpu0": "timeshared"}
    assert by_name["extra-draining"]["state"] == "parked"  # held, not serving


def test_the_model_table_filters_by_name_state_and_device():
    st = big_status()
    rows = lambda text: [l for l in text.splitlines() if l.startswith(("tiny-", "extra-"))]
    assert len(rows(status_table(st))) == N + 3
    only = status_table(st, name="tiny-1*")
    assert len(rows(only)) == 10 and "(10 of 63 models shown)" in only
    assert [r.split()[0] for r in rows(status_table(st, state="cold"))] == ["extra-cold"]
    assert len(rows(status_table(st, device="cpu1"))) == 2
    assert "no model matches" in status_table(st, name="nope*")
