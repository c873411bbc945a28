"""The engine worker's model registry and state machine, without Ray or vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.catalog import ModelSpec
from cluster.engine.checkpoint import CheckpointInfo
from cluster.engine.contract import ModelState
from cluster.engine.registry import (ENTRY_STATES, TRANSITIONS, InvalidTransitionError,
                                     ModelRegistry)
from cluster.errors import UnknownModelError

S = ModelState


def entry_in(reg: ModelRegistry, name: str, state: ModelState, family: str = "llama"):
    spec = ModelSpec(name=name, path=f"/m/{name}", family=family, weights_bytes=1)
    return reg.add(spec, CheckpointInfo(Path(spec.path), "X", family, None), state)


def test_every_state_is_in_the_table_and_unloading_is_final():
    assert set(TRANSITIONS) == set(ModelState)
    assert TRANSITIONS[S.UNLOADING] == frozenset()
    assert all(S.UNLOADING in TRANSITIONS[s] for s in ModelState if s is not S.UNLOADING)


@pytest.mark.parametrize("start", sorted(ENTRY_STATES))
@pytest.mark.parametrize("target", list(ModelState))
def test_a_transition_happens_exactly_when_the_table_allows_it(start, target):
    reg = ModelRegistry("d0")
    e = entry_in(reg, "m", start)
    if target is start or target in TRANSITIONS[start]:
        reg.move(e, target)
        assert e.state is target
    else:
        with pytest.raises(InvalidTransitionError, match=f"cannot go from {start} to {target}"):
            reg.move(e, target)
        assert e.state is start  # a refused move changes nothing


def test_a_member_serves_while_parked_and_never_parks():
    reg = ModelRegistry("d0")
    m = entry_in(reg, "m", S.TIMESHARED)
    assert m.routable and not m.in_engine
    with pytest.raises(InvalidTransitionError):
        reg.move(m, S.PARKED)
    with pytest.raises(InvalidTransitionError):
        reg.move(m, S.ACTIVE)
    assert [e.name for e in reg.members("llama")] == ["m"]
    assert reg.members("qwen") == []


def test_routable_follows_the_state_and_the_draining_flag():
    reg = ModelRegistry("d0")
    e = entry_in(reg, "m", S.LOADING)
    assert not e.routable and e.in_engine
    reg.move(e, S.ACTIVE)
    assert e.routable and e.in_engine
    e.draining = True
    assert not e.routable
    reg.move(e, S.PARKED)
    assert not e.routable and not e.in_engine


def test_lookups_name_the_device_and_what_is_loaded():
    reg = ModelRegistry("gpu7")
    entry_in(reg, "a", S.PARKED)
    with pytest.raises(UnknownModelError, match=r"'zz' is not loaded on device 'gpu7'; loaded: \['a'\]"):
        reg.get("zz")
    with pytest.raises(InvalidTransitionError, match="already registered"):
        entry_in(reg, "a", S.PARKED)
    with pytest.raises(InvalidTransitionError, match="cannot enter as active"):
        entry_in(reg, "b", S.ACTIVE)
    reg.remove("a")
    assert "a" not in reg and len(reg) == 0
