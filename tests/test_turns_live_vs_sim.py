"""One turn logic, two drivers: the simulator's engine and the engine
worker's live ``TimeShareScheduler`` make the same decisions on the same
events. No Ray, no vLLM.

The simulator serves a small trace on one time-shared device and records
what happened (each engine segment's outputs with their times, each weight
switch). The live driver then runs for real, its own asyncio loop and all,
on a virtual clock, over a FAKE shell that replays those outputs at those
times and a switch that takes the recorded time. Both turn machines log
every decision (arrivals joining a turn, picks, turn starts, judgements,
preemptions) with its time: the logs must be equal.
"""

from __future__ import annotations

import asyncio
import selectors

import pytest

from cluster.catalog import TimeshareConfig
from cluster.engine.timeshare import TimeShareScheduler, turn_config
from cluster.sim.fidelity import aliases, timeshared_device
from cluster.sim.profiles import load_models
from cluster.sim.workload import Arrival
from policies.turns import Keep
from tests.helpers import measured_device

SLO = (2.0, 0.05)  # TTFT, TPOT: tight enough that turns end on slack, not only on idleness
# Measured-style engine times, odd enough that no two happenings coincide.
DEVICE = measured_device("test-cpu", 0.0071, 0.00013, {1: 0.0043, 8: 0.0061}, swap_s=0.0337)
TRACE = [Arrival(0.0, "qwen2.5-7b-0", 17, 60), Arrival(0.0123, "qwen2.5-7b-1", 23, 45),
         Arrival(0.0311, "qwen2.5-7b-2", 11, 70), Arrival(0.2017, "qwen2.5-7b-0", 29, 30),
         Arrival(0.4129, "qwen2.5-7b-1", 13, 80), Arrival(0.9001, "qwen2.5-7b-2", 19, 25)]
DISCIPLINES = {
    "token": {"discipline": "token", "min_quota_s": 0.02, "max_round_s": 0.3},
    "aegaeon": {"discipline": "aegaeon", "min_quota_s": 0.02, "max_round_s": 0.15},
}


def simulated(turns: dict):

    models = aliases(load_models()["qwen2.5-7b"], 3)
    sim, engine = timeshared_device(DEVICE, models, *SLO,
                                    turns=turn_config(TimeshareConfig(**turns)))
    engine.skip_judgements = False  # judged every min_quota_s, as live
    engine.machine.log, engine.record = [], []
    results = sim.run(TRACE, 60.0, place=False)
    assert results.finished == len(TRACE)
    return engine.machine.log, engine.record, results


# --- the live driver on a virtual clock ------------------------------------------

class _VirtualSelector:
    """Never blocks: a wait for the next timer moves the clock there instead."""

    def __init__(self, loop: "VirtualTimeLoop", inner: selectors.BaseSelector):
        self._loop, self._inner = loop, inner

    def select(self, timeout=None):
        if timeout:
            self._loop.now += timeout
        return self._inner.select(0)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self):
        super().__init__()
        self.now = 0.0
        self._selector = _VirtualSelector(self, self._selector)

    def time(self) -> float:
        return self.now


class FakeParams:
    """The part of vLLM's SamplingParams the live driver uses."""

    def __init__(self, max_tokens: int, min_tokens: int = 0):
        self.max_tokens, self.min_tokens = max_tokens, min_tokens

    def clone(self) -> "FakeParams":
        return FakeParams(self.max_tokens, self.min_tokens)


class _Out:
    def __init__(self, n: int, finished: bool):
        self.outputs = [type("Completion", (), {"token_ids": [0] * n})()]
        self.finished = finished


class FakeShell:
    """Replays the simulator's outputs for each engine segment at their times."""

    def __init__(self, outputs: dict[str, list[tuple[float, int]]]):
        self.outputs, self.resident = outputs, None

    async def generate(self, prompt_ids, params, seg_id):
        loop = asyncio.get_running_loop()
        sent = 0
        for at, n in self.outputs.get(seg_id, []):
            await asyncio.sleep(max(0.0, at - loop.time()))
            sent += n
            yield _Out(n, sent >= params.max_tokens)
        await asyncio.Event().wait()  # preempted before more: wait to be cancelled


def live(turns: dict, record: list[tuple]) -> list[tuple]:
    outputs: dict[str, list[tuple[float, int]]] = {}
    switches = []
    for kind, *rest in record:
        if kind == "output":
            seg, at, n = rest
            outputs.setdefault(seg, []).append((at, n))
        else:
            switches.append(rest)  # (model, done_at, took_s)
    log: list[tuple] = []

    async def main():
        loop = asyncio.get_running_loop()
        shell = FakeShell(outputs)
        shell.resident = "qwen2.5-7b-0"
        done = iter(switches)

        async def switch(model: str) -> float:
            want, at, took = next(done)
            assert want == model
            await asyncio.sleep(max(0.0, at - loop.time()))
            shell.resident = model
            return took

        sched = TimeShareScheduler(shell, switch, lambda m: SLO, TimeshareConfig(**turns),
                                   clock=loop.time)
        sched.turns.log = log

        async def client(i: int, a: Arrival) -> int:
            await asyncio.sleep(a.time_s)
            n = 0
            async for out in sched.generate(a.model, [1] * a.input_tokens,
                                            FakeParams(a.output_tokens), f"r{i}"):
                n += len(out.outputs[0].token_ids)
            return n

        counts = await asyncio.gather(*(client(i, a) for i, a in enumerate(TRACE)))
        assert counts == [a.output_tokens for a in TRACE]
        sched.close()

    loop = VirtualTimeLoop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return log


def _decisions(log: list[tuple]) -> list[tuple]:
    """The log without idle picks (the live loop also asks when woken with
    nothing to do), times rounded to a nanosecond."""
    def plain(x):
        if isinstance(x, Keep):
            return ("keep", plain(x.wait_s))
        return round(x, 9) if isinstance(x, float) else x

    return [tuple(plain(x) for x in rec) for rec in log
            if not (rec[0] == "pick" and rec[2] is None)]


@pytest.mark.parametrize("name", sorted(DISCIPLINES))
def test_live_driver_makes_the_simulators_decisions(name):
    sim_log, record, _ = simulated(DISCIPLINES[name])
    assert any(rec[0] == "preempt" and rec[1] for rec in sim_log), "turns must preempt here"
    assert sum(1 for rec in record if rec[0] == "switch") >= 3
    live_log = live(DISCIPLINES[name], record)
    assert len(sim_log) > 40
    assert _decisions(live_log) == _decisions(sim_log)
