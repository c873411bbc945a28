"""Token-level time-sharing: three models take turns on one device's engine,
real vLLM on CPU. The device's budget holds one model at a time."""

from __future__ import annotations

import pytest
import ray

from cluster.catalog import TimeshareConfig
from cluster.engine.contract import GroupStats, ModelState, WorkerStats
from cluster.errors import RequestAbortedError
from tests.conftest import KV_BYTES, MiB
from tests.helpers import CACHED_PROMPT, LONG_PROMPT, collect, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.ray]

MODELS = ["tiny-llama-a", "tiny-llama-b", "tiny-llama-c"]
PROMPTS = [LONG_PROMPT, "Tokens from many models share one device, one decode step at a time."]
SAMPLING = {"temperature": 0.0, "max_tokens": 40, "ignore_eos": True}
# ~0.6 s of decoding here: longer than a LONG_TURNS turn, so it is preempted.
LONG_RUN = {"temperature": 0.0, "max_tokens": 400, "ignore_eos": True}
# Shoal's slack-driven turns, re-judged every 20 ms; with the models' default
# SLOs every request is preempted often.
SHORT_TURNS = {"discipline": "token", "min_quota_s": 0.02, "max_round_s": 0.02}
# Long fixed turns (Aegaeon's quotas, clamped): a preempted request stays
# preempted for a while, a window the tests can act in.
LONG_TURNS = {"discipline": "aegaeon", "min_quota_s": 0.2, "max_round_s": 0.2}


@pytest.fixture(scope="module")
def shared_ts(ray_local, spec):
    from cluster.engine.device import DeviceSpec
    from cluster.engine.worker import start_engine_worker

    footprint = spec("tiny-llama-a").weights_bytes + KV_BYTES
    w = start_engine_worker(DeviceSpec("cpu-timeshare", "cpu", footprint + 8 * MiB,
                                       timeshare=TimeshareConfig(**SHORT_TURNS)))
    for m in MODELS:  # the first starts the engine; the others join it
        ray.get(w.load.remote(spec(m)))
    yield w
    ray.get(w.shutdown.remote())


@pytest.fixture
def ts(shared_ts, spec):
    """The time-shared device at its baseline before every test: short
    turns, all three models members (``load`` of a member is a no-op)."""
    ray.get(shared_ts.set_timeshare.remote(SHORT_TURNS))
    for m in MODELS:
        ray.get(shared_ts.load.remote(spec(m)))
    return shared_ts


def run(worker, model, prompt=LONG_PROMPT, sampling=SAMPLING):
    return collect(worker.generate.remote(model, prompt=prompt, sampling=sampling))


@pytest.fixture(scope="module")
def dedicated(shared_worker, shared_ts, spec):
    """Each (model, prompt)'s greedy output without time-sharing: A and B
    from the session worker's engines of their own; C alone on the shared
    device (nothing else has work, so it is never preempted)."""
    from tests.conftest import at_baseline

    worker = at_baseline(shared_worker, spec)
    out = {}
    for m in MODELS:
        for p in PROMPTS:
            out[m, p] = run(worker if m != "tiny-llama-c" else shared_ts, m, p)[0]
    for m in MODELS:
        out[m, "long"] = run(shared_ts, m, LONG_PROMPT, LONG_RUN)[0]
    out["cached"] = run(worker, "tiny-llama-b", CACHED_PROMPT)[0]
    return out


def stats(worker) -> WorkerStats:
    return ray.get(worker.stats.remote())


def turns(worker) -> GroupStats:
    (sched,) = stats(worker).groups.values()
    return sched


def test_models_join_one_engine_and_all_serve(ts, spec):
    s = stats(ts)
    assert len(s.shells) == 1 and len(s.groups) == 1
    footprint = spec("tiny-llama-a").weights_bytes + KV_BYTES
    assert s.device.memory_used_bytes == footprint  # one model's worth, not three
    for m in MODELS:
        assert s.models[m].state is ModelState.TIMESHARED and s.models[m].routable
    assert sum(s.models[m].in_engine for m in MODELS) == 1  # one resident at a time
    # The controller's verbs leave a member to its scheduler: no new engine.
    parked = next(m for m in MODELS if not s.models[m].in_engine)
    for verb in (ts.wake.remote(parked), ts.swap.remote(parked), ts.park.remote(parked),
                 ts.load.remote(spec(parked))):
        assert ray.get(verb).routable
    s = stats(ts)
    assert len(s.shells) == 1 and s.device.memory_used_bytes == footprint


def test_concurrent_streams_equal_dedicated_runs(ts, dedicated):
    """Six streams over three models at once, each preempted many times:
    every output equals its dedicated run, token for token."""
    before = turns(ts)
    streams = {(m, p): ts.generate.remote(m, prompt=p, sampling=SAMPLING)
               for m in MODELS for p in PROMPTS}
    for key, stream in streams.items():
        ids, chunks = collect(stream)
        assert ids == dedicated[key], key
        assert chunks[-1]["finished"]
    after = turns(ts)
    assert after.switches - before.switches >= 6  # they really took turns
    assert after.preemptions - before.preemptions >= 6
    assert all(v.queued == v.in_engine == 0 for v in after.models.values())
    s = stats(ts)
    assert all(s.models[m].tpot_s > 0 and s.models[m].ttft_s > 0 for m in MODELS)


def test_prefix_cache_is_reset_on_every_switch(ts, dedicated):
    """Same model twice: the second run's prompt comes from vLLM's prefix
    cache. Then another model on the same prompt: nothing may come from the
    cache (it holds the first model's KV), and its output is its own."""
    run(ts, "tiny-llama-a", CACHED_PROMPT)
    ids, chunks = run(ts, "tiny-llama-a", CACHED_PROMPT)
    assert chunks[0]["num_cached_tokens"] >= 128  # the cache is on and would be hit
    ids, chunks = run(ts, "tiny-llama-b", CACHED_PROMPT)
    assert chunks[0]["num_cached_tokens"] == 0
    assert ids == dedicated["cached"]


def _preempted(worker, model: str) -> bool:
    t = turns(worker).models.get(model)
    return t is not None and t.preempted > 0


def test_client_disconnect_during_preemption(ts, dedicated):
    """B's client leaves while B's request sits preempted: it is dropped
    there (no engine request, nothing queued), the others finish right."""
    ray.get(ts.set_timeshare.remote(LONG_TURNS))
    streams = {m: ts.generate.remote(m, prompt=LONG_PROMPT, sampling=LONG_RUN)
               for m in MODELS}
    ray.get(next(streams["tiny-llama-b"]))
    wait_until(lambda: _preempted(ts, "tiny-llama-b"), timeout_s=30, every_s=0.01)
    ray.cancel(streams.pop("tiny-llama-b"))
    wait_until(lambda: stats(ts).models["tiny-llama-b"].running == 0, timeout_s=10)
    b = turns(ts).models["tiny-llama-b"]
    assert b.queued == b.in_engine == b.preempted == 0
    for m, stream in streams.items():
        assert collect(stream)[0] == dedicated[m, "long"]
    wait_until(lambda: all(s.engine_unfinished == 0
                           for s in stats(ts).shells.values()), timeout_s=10)


def test_unload_while_preempted_fails_its_requests_clearly(ts, spec, dedicated):
    """B is unloaded while its requests wait preempted: each gets an error
    that says so; A and C keep their turns and finish right; the shared
    engine stays. Long fixed turns keep B preempted while A and C run."""
    ray.get(ts.set_timeshare.remote(LONG_TURNS))
    b_streams = [ts.generate.remote("tiny-llama-b", prompt=p, sampling=LONG_RUN)
                 for p in PROMPTS]
    for s in b_streams:
        ray.get(next(s))
    others = {m: ts.generate.remote(m, prompt=LONG_PROMPT, sampling=LONG_RUN)
              for m in ("tiny-llama-a", "tiny-llama-c")}
    wait_until(lambda: _preempted(ts, "tiny-llama-b"), timeout_s=30, every_s=0.01)
    result = ray.get(ts.unload.remote("tiny-llama-b"))
    assert result.aborted_requests == 2
    for s in b_streams:
        with pytest.raises(RequestAbortedError, match="tiny-llama-b' was unloaded"):
            collect(s)
    for m, stream in others.items():
        assert collect(stream)[0] == dedicated[m, "long"]
    s = stats(ts)
    assert "tiny-llama-b" not in s.models and len(s.shells) == 1
    ray.get(ts.load.remote(spec("tiny-llama-b")))  # rejoins; served again
    assert run(ts, "tiny-llama-b")[0] == dedicated["tiny-llama-b", LONG_PROMPT]


def test_the_controller_view_shows_time_shared_copies_and_their_latencies(ts, spec):
    """What the controller builds from this worker's real stats: every member
    is a time-shared copy with measured TTFT and TPOT. The policy's verdict
    depends on those measurements against the SLOs, so the SLOs are set
    relative to what this machine measured (a slower machine measures a
    slower TPOT): well within them, the default policy leaves the members to
    the device's scheduler; far beyond them, it wants capacity elsewhere."""
    from cluster.control.view_builder import build_view
    from cluster.engine.device import DeviceSpec
    from policies import Demand, DefaultPolicy, RequestCapacity

    for m in MODELS:  # each measured at least once, whatever ran before
        run(ts, m)
    s = stats(ts)
    device = ray.get(ts.ping.remote())
    dev = DeviceSpec(device, "cpu", s.device.memory_budget_bytes,
                     timeshare=TimeshareConfig(**SHORT_TURNS))
    worst_tpot = max(s.models[m].tpot_s for m in MODELS)
    worst_ttft = max(s.models[m].ttft_s for m in MODELS)

    def view(slack: float):
        slo = {"ttft_s": worst_ttft * slack, "tpot_s": worst_tpot * slack}
        return build_view({device: dev}, {device: s},
                          {m: spec(m, slo=slo) for m in MODELS},
                          {m: Demand(rate=1.0, queue=1) for m in MODELS})

    for m in MODELS:
        (p,) = view(1.0).model(m).placements
        assert p.timeshared and p.ttft_s > 0 and p.tpot_s > 0
    assert DefaultPolicy().decide(view(slack=10.0), now=0.0) == []
    overloaded = DefaultPolicy().decide(view(slack=0.1), now=0.0)
    # No other device here: the overloaded members ask for capacity.
    assert overloaded and all(isinstance(a, RequestCapacity) for a in overloaded)
    assert {a.for_model for a in overloaded} <= set(MODELS)
