"""The simulator (cluster/sim/): cost model, workloads, determinism, the
policy checks, the fidelity hook and a small scale run. No Ray, no vLLM."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from cluster.sim.cluster import SimulationError
from cluster.sim.costmodel import (DECODE_MBU, FRESH_ENGINE_INIT_S, SWAP_FIXED_S, MeasuredCost,
                                   RooflineCost, Switch, cost_model)
from cluster.sim.fidelity import aliases, simulate_timeshared
from cluster.sim.profiles import (ProfileError, device_file_json, load_device_file, load_devices,
                                  load_models, tp_group)
from cluster.sim.run import expand, simulate
from cluster.sim.systems import ServedModel
from cluster.sim.workload import (Arrival, aegaeon_catalog, gamma, poisson, power_law_rates,
                                  read_csv, write_csv)
from policies import ACTIVE, LOADING, DefaultPolicy, Load
from tests.helpers import measured_device

DEVICES, MODELS = load_devices(), load_models()
QWEN = MODELS["qwen2.5-7b"]


# --- cost model, against numbers worked out by hand ---------------------------------

def test_decode_step_is_a_read_of_the_weights_at_the_achievable_bandwidth():
    h800 = RooflineCost(DEVICES["h800"])
    # 15.22 GB / (3.35 TB/s * 0.7) = 6.4904 ms, plus the 4 ms step overhead.
    assert h800.decode_step_s(QWEN, 1, 0) == pytest.approx(0.0104904, rel=1e-4)
    # 32 requests holding 16,000 tokens: + 16,000 * 57,344 B of KV = 0.9175 GB more read.
    assert h800.decode_step_s(QWEN, 32, 16_000) == pytest.approx(
        (15.22e9 + 16_000 * 57_344) / (3.35e12 * 0.7) + 0.004, rel=1e-9)
    # H20: slower compute, faster memory: decode is faster there (4.0 TB/s).
    assert RooflineCost(DEVICES["h20"]).decode_step_s(QWEN, 1, 0) == pytest.approx(
        15.22e9 / (4.0e12 * 0.7) + 0.004)


def test_prefill_is_compute_bound_and_never_below_one_read_of_the_weights():
    h800 = RooflineCost(DEVICES["h800"])
    # 100 tokens: 2*7.61e9*100 + 2*28*3584*100^2 = 1.5240e12 FLOP at 989e12*0.5
    # = 3.082 ms < the 6.490 ms weight read: the read wins.
    assert h800.prefill_s(QWEN, [100]) == pytest.approx(0.0064904 + 0.004, rel=1e-4)
    # 2,000 tokens: 3.044e13 + 8.028e11 = 3.1243e13 FLOP -> 63.18 ms, plus 4 ms.
    assert h800.prefill_s(QWEN, [2000]) == pytest.approx(0.06718, rel=1e-3)
    # A batch costs the sum of its requests' work, once the overhead.
    assert h800.prefill_s(QWEN, [2000, 2000]) == pytest.approx(2 * 0.06318 + 0.004, rel=1e-3)


def test_switch_costs_by_kind():
    h800 = RooflineCost(DEVICES["h800"])
    copy = 15.22e9 / 55e9  # 0.2767 s over PCIe 5 at ~55 GB/s
    assert h800.switch_s(QWEN, Switch.IN_PLACE) == pytest.approx(SWAP_FIXED_S + copy)
    assert h800.switch_s(QWEN, Switch.FRESH) == pytest.approx(FRESH_ENGINE_INIT_S + copy)
    # ServerlessLLM's anchor: 16.06 GB in 0.7 s, so 15.22 GB in 0.663 s.
    assert h800.switch_s(QWEN, Switch.SERVERLESS) == pytest.approx(0.7 * 15.22 / 16.06)
    # The wake fit goes through both published points (A100, 25 GB/s).
    a100 = RooflineCost(DEVICES["a100"])
    small = QWEN.__class__(**{**QWEN.__dict__, "weights_bytes": int(1.2e9)})
    large = QWEN.__class__(**{**QWEN.__dict__, "weights_bytes": int(16.4e9)})
    assert a100.switch_s(small, Switch.WAKE) == pytest.approx(0.26)
    assert a100.switch_s(large, Switch.WAKE) == pytest.approx(2.2)


def test_a_tensor_parallel_group_is_one_device_of_n_times_the_peaks():
    group = tp_group(DEVICES["h800"], 4)
    assert group.devices == 4 and group.memory_bytes == 320e9
    assert group.cost_per_hour == pytest.approx(4 * DEVICES["h800"].cost_per_hour)
    # Qwen2.5-72B: 145.4 GB / (4 * 3.35 TB/s * 0.85 all-reduce * 0.7) + 4 ms = 22.24 ms.
    step = RooflineCost(group).decode_step_s(MODELS["qwen2.5-72b"], 1, 0)
    assert step == pytest.approx(145.4e9 / (4 * 3.35e12 * 0.85 * DECODE_MBU) + 0.004)
    assert step == pytest.approx(0.02224, rel=1e-3)


MEASURED = measured_device("cpu-test", 0.01, 0.001, {1: 0.004, 8: 0.006}, swap_s=0.02)


def test_a_measured_profile_is_used_as_measured(tmp_path):
    cost = cost_model(MEASURED)
    assert isinstance(cost, MeasuredCost)
    assert cost.decode_step_s(QWEN, 4, 10_000) == pytest.approx(0.004 + 3 * 0.002 / 7)
    assert cost.decode_step_s(QWEN, 16, 0) == pytest.approx(0.004 + 15 * 0.002 / 7)
    assert cost.prefill_s(QWEN, [100, 50]) == pytest.approx(0.01 + 0.15)
    assert cost.switch_s(QWEN, Switch.IN_PLACE) == 0.02
    path = tmp_path / "cpu.json"
    path.write_text(device_file_json(MEASURED, "test"))
    assert load_device_file(path) == MEASURED


def test_a_bad_profile_file_names_the_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(device_file_json(MEASURED, "x").replace('"memory_bytes": 8589934592',
                                                            '"memory_bytes": -1'))
    with pytest.raises(ProfileError, match=r"devices\.0\.memory_bytes"):
        load_device_file(path)


# --- workloads ----------------------------------------------------------------------

def test_arrivals_follow_their_rates_and_the_same_seed_gives_the_same_trace():
    rates = power_law_rates([f"m{i}" for i in range(20)], 10.0, 1.2)
    assert sum(rates.values()) == pytest.approx(10.0) and rates["m0"] > rates["m1"] > rates["m19"]
    trace = poisson(rates, 2000, seed=3)
    assert len(trace) == pytest.approx(20_000, rel=0.03)
    assert sum(a.model == "m0" for a in trace) / len(trace) == pytest.approx(
        rates["m0"] / 10, rel=0.05)
    assert trace == poisson(rates, 2000, seed=3) and trace != poisson(rates, 2000, seed=4)
    assert all(a.time_s <= b.time_s for a, b in zip(trace, trace[1:]))
    # ShareGPT-like lengths: the documented means, within sampling error.
    assert np.mean([a.input_tokens for a in trace]) == pytest.approx(161, rel=0.05)
    assert np.mean([a.output_tokens for a in trace]) == pytest.approx(338, rel=0.05)


def test_gamma_arrivals_have_the_asked_burstiness():
    trace = gamma({"m": 2.0}, cv=3.0, duration_s=20_000, seed=1)
    gaps = np.diff([a.time_s for a in trace])
    assert gaps.mean() == pytest.approx(0.5, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)


def test_csv_traces_round_trip_and_bad_rows_name_their_line(tmp_path):
    trace = poisson({"a": 1.0, "b": 0.5}, 50, seed=0)
    path = tmp_path / "t.csv"
    write_csv(trace, path)
    back = read_csv(path)
    assert [(a.model, a.input_tokens, a.output_tokens) for a in back] == \
        [(a.model, a.input_tokens, a.output_tokens) for a in trace]
    path.write_text("time,model,input_tokens,output_tokens\n0.5,a,10,3\n1.0,b,x,3\n")
    with pytest.raises(ValueError, match=":3:"):
        read_csv(path)


# --- runs ------------------------------------------------------------------------------

def small(n: int = 16, rate: float = 0.1):
    models = [ServedModel(p, rate=rate) for p in aegaeon_catalog(n, MODELS)]
    return models, poisson({m.name: rate for m in models}, 300, seed=7)


def test_same_seed_same_result():
    models, trace = small()
    a = simulate("shoal", expand({"h800": 3}), models, trace, warmup_s=60)
    b = simulate("shoal", expand({"h800": 3}), models, trace, warmup_s=60)
    drop = ("wall_s", "events_per_s")
    assert a.summary == b.summary
    assert {k: v for k, v in a.counters.items() if k not in drop} == \
        {k: v for k, v in b.counters.items() if k not in drop}
    assert a.counters["switches"] > 0 and a.counters["preemptions"] > 0  # it time-shared
    assert [o for o in a.results.outcomes()] == [o for o in b.results.outcomes()]


class WeightsOnlyPolicy:
    """A planted bug: it checks room against the weights and forgets the KV
    cache a copy also reserves, so it over-commits devices."""

    name = "weights-only"

    def decide(self, view, now):
        used = {d.id: view.used_bytes(d.id) for d in view.devices}
        actions = []
        for m in view.models:
            if view.demand_of(m.name).queue and not m.on(ACTIVE, LOADING):
                for d in view.devices:
                    if used[d.id] + m.weights_bytes <= d.memory_bytes:  # the bug: not footprint
                        actions.append(Load(m.name, d.id))
                        used[d.id] += m.weights_bytes
                        break
        return actions


def test_the_simulator_catches_a_policy_that_over_commits_memory():
    """Eight models asked for at once: the buggy policy puts several on one
    device in one round; the correct one does not."""
    models, _ = small(8)
    trace = tuple(Arrival(0.001 * i, m.name, 100, 50) for i, m in enumerate(models))
    with pytest.raises(SimulationError, match="over-commit"):
        simulate("shoal", expand({"h800": 2}), models, trace, policy=WeightsOnlyPolicy(),
                 strict=True)
    run = simulate("shoal", expand({"h800": 2}), models, trace, policy=WeightsOnlyPolicy())
    assert run.counters["policy_violations"] > 0
    assert "over-commit" in run.counters["violation_examples"][0]
    fine = simulate("shoal", expand({"h800": 2}), models, trace, policy=DefaultPolicy(),
                    strict=True)
    assert fine.counters["policy_violations"] == 0


def test_every_system_serves_the_same_trace():
    models, trace = small(8)
    for system in ("shoal", "dedicated", "serverless", "muxserve"):
        run = simulate(system, expand({"h800": 8}), models, trace, warmup_s=60)
        assert run.summary["requests"] == sum(a.time_s >= 60 for a in trace)
        assert run.summary["slo_attainment"] > 0.9, system  # a device per model: easy


def test_a_thousand_models_run_at_scale():
    from cluster.sim.scenarios import scale

    t = time.perf_counter()
    out = scale(models=1000, duration_s=300, devices=125)
    assert time.perf_counter() - t < 120  # generous: the CLI run is an hour in <= 60 s
    assert out["requests"] > 4000 and out["events"] > out["requests"]
    # Five scored minutes right after the warm-up: a few cold models still wait.
    assert out["summary"]["finished"] >= 0.98 * out["summary"]["requests"]
    assert out["summary"]["slo_attainment"] > 0.9
    assert out["counters"]["policy_violations"] == 0


def test_the_fidelity_hook_returns_every_request(tmp_path):
    models = aliases(load_models()["qwen2.5-7b"], 3)
    trace = [Arrival(0.1 * i, models[i % 3].name, 20, 30) for i in range(12)]
    path = tmp_path / "trace.csv"
    write_csv(trace, path)
    out = simulate_timeshared(path, MEASURED, models, ttft_slo_s=5.0, tpot_slo_s=0.5,
                              kv_cache_bytes=10**9)
    assert len(out.outcomes) == 12 and all(o.finished for o in out.outcomes)
    assert out.switches >= 2 and out.summary["slo_attainment"] == 1.0
    assert all(o.ttft_s > 0 and o.tpot_s > 0 and not math.isnan(o.tpot_s) for o in out.outcomes)


def test_searches_find_the_fewest_devices_and_a_mix_that_never_costs_more():
    from cluster.sim.search import cheapest_pool, min_devices, sustainable_rate

    assert min_devices(lambda n: 1.0 if n >= 13 else 0.5, 1, 80) == 13
    assert min_devices(lambda n: 0.5, 1, 80) is None  # never reached: no answer, not 80
    assert sustainable_rate({0.1: 0.99, 0.2: 0.95, 0.3: 0.5, 0.4: 0.95}, 0.9) == 0.2
    # Capacity per device and price: "big" does the work of three "small" for 1.85 vs 3 x 0.97.
    cap, price = {"small": 1, "big": 3, "pricey": 1}, {"small": 0.97, "big": 1.85, "pricey": 3.0}

    def attainment(pool):
        return 1.0 if sum(cap[t] * n for t, n in pool.items()) >= 10 else 0.8

    pool, runs = cheapest_pool(attainment, {"small": 10}, price, list(price))
    cost = sum(price[t] * n for t, n in pool.items())
    assert attainment(pool) == 1.0 and cost < 10 * 0.97 and runs <= 40
    assert pool.get("big", 0) >= 2
    same, _ = cheapest_pool(lambda p: 0.0, {"small": 10}, price, list(price))
    assert same == {"small": 10}  # nothing better passes: the start stands
