"""A worker whose vLLM engine died ends itself (``worker._or_die``), so its
requests move like after any worker death; ``shell.engine_died`` tells a
dead engine from a request that failed. Fast: no engine is started."""

from __future__ import annotations

import asyncio

import pytest
from vllm.v1.engine.exceptions import EngineDeadError

from cluster.engine import worker as worker_mod
from cluster.engine.shell import engine_died


def test_a_dead_engine_is_recognised_through_wrappers():
    assert engine_died(EngineDeadError())
    try:
        try:
            raise EngineDeadError()
        except EngineDeadError as e:
            raise RuntimeError("the stream broke") from e
    except RuntimeError as wrapped:
        assert engine_died(wrapped)
    assert not engine_died(RuntimeError("a request failed"))
    assert not engine_died(ValueError("bad sampling"))


async def _chunks(error: Exception):
    yield {"token_ids": [1]}
    raise error


def test_the_worker_exits_on_a_dead_engine_and_re_raises_anything_else(monkeypatch):
    exits: list[int] = []

    def fake_exit(code: int):
        exits.append(code)
        raise SystemExit(code)
    monkeypatch.setattr(worker_mod.os, "_exit", fake_exit)

    async def drain(error: Exception):
        return [c async for c in worker_mod._or_die(_chunks(error), "dev")]
    with pytest.raises(ValueError):
        asyncio.run(drain(ValueError("a request failed")))
    assert exits == []
    with pytest.raises(SystemExit):
        asyncio.run(drain(EngineDeadError()))
    assert exits == [1]
