"""Prepared-weight swaps on CPU (``cluster/engine/cpu_weight_swap.py``).

The engine test drives ``EngineShell`` directly (no Ray) with two real vLLM
engines: one per model, for the fresh-engine references; swaps run in the
first. Its prompt spans more than two KV blocks, so a missing prefix-cache reset
or a kernel left from the other model would change the greedy tokens.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from tests.helpers import CACHED_PROMPT, GREEDY

pytestmark = pytest.mark.engine

A, B, C = "tiny-llama-a", "tiny-llama-b", "tiny-llama-c"


# --------------------------------------------------------------- no engine
class _ToyLinear(torch.nn.Module):
    """Shaped like vLLM's CPU linear: emptied weight, kernel in a closure."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        self.cpu_linear = lambda x, weight, bias: x @ w.t()


class _Toy(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = torch.nn.Parameter(torch.randn(4, generator=g))  # requires grad
        self.proj = _ToyLinear(torch.randn(4, 4, generator=g))

    def forward(self, x):
        return self.proj.cpu_linear(x * self.norm, None, None)


def test_capture_apply_round_trip_and_mismatch_leaves_model_untouched():
    from cluster.engine.cpu_weight_swap import apply, capture

    live, other = _Toy(1), _Toy(2)
    x = torch.ones(1, 4)
    want_live, want_other = live(x), other(x)
    mine, theirs = capture(live), capture(other)
    assert mine.tensor_bytes == 4 * 4 and len(mine.kernels) == 1

    norm, ptr = live.norm, live.norm.data_ptr()
    assert apply(live, theirs) == 16  # norm copied; proj kernel re-pointed
    assert torch.equal(live(x), want_other)
    assert live.norm is norm and norm.data_ptr() == ptr  # copied in place
    assert torch.equal(norm, other.norm)
    apply(live, mine)
    assert torch.equal(live(x), want_live)

    bad = capture(_Toy(3))
    bad.tensors["norm"] = torch.zeros(5)
    with pytest.raises(ValueError, match="norm"):
        apply(live, bad)
    assert torch.equal(live(x), want_live)  # checked before anything was written


# ------------------------------------------------------------ real engines
async def _greedy(shell) -> list[int]:
    from vllm import SamplingParams

    last = None
    async for out in shell.generate(shell.tokenize(CACHED_PROMPT), SamplingParams(**GREEDY),
                                    uuid.uuid4().hex):
        last = out
    return list(last.outputs[0].token_ids)


async def _scenario(spec) -> None:
    from cluster.engine.checkpoint import read_checkpoint
    from cluster.engine.shell import PREPARED, RELOAD, EngineShell
    from cluster.engine.weight_cache import HostWeightCache

    async def start(name):
        s = spec(name)
        return await EngineShell.start(f"fast-{name}", s, read_checkpoint(s.path),
                                       sleep_mode=False, eager=True)

    cache = HostWeightCache(owner="test-fast-swap")
    shell = None
    try:
        dirs = {n: str(cache.put(n, spec(n).path).dir) for n in (A, B)}
        fresh_b = await start(B)
        try:
            ref = {B: await _greedy(fresh_b)}
        finally:
            fresh_b.shutdown()
        shell = await start(A)
        ref[A] = await _greedy(shell)
        assert ref[A] != ref[B]
        assert shell.prepared_swaps, shell.prepared_swaps_off_reason

        async def swap(name, path):
            seconds = await shell.swap_in(name, dirs[name])
            assert (shell.last_swap_path, shell.resident) == (path, name)
            assert await _greedy(shell) == ref[name], f"{name} via {path}"
            return seconds

        # First visits reload (A too: the engine loaded it from another path).
        await swap(B, RELOAD)
        await swap(A, RELOAD)
        fast = [await swap(n, PREPARED) for n in (B, A, B, A)]
        assert max(fast) < 5

        held = shell.prepared_bytes()
        assert set(held) == {A, B} and held[A] == held[B] > 0
        summary = shell.prepared_summary(A)
        # tiny-llama: 2 layers x (qkv, o, gate_up, down) + embed_tokens + lm_head
        assert summary["kernels"] == 10 and summary["kernel_bytes"] > 0
        assert summary["bytes"] == summary["tensor_bytes"] + summary["kernel_bytes"]

        # Forgetting frees the copy; the next visit reloads and is still right.
        assert await shell.forget(B) and not await shell.forget(B)
        assert set(shell.prepared_bytes()) == {A}
        await swap(A, PREPARED)  # forgetting B left A's copy alone
        await swap(B, RELOAD)
        await swap(A, PREPARED)

        # The same name re-cached from other files must not get the old copy.
        cache.drop(B)
        dirs[B] = str(cache.put(B, spec(C).path).dir)
        await shell.swap_in(B, dirs[B])
        assert shell.last_swap_path == RELOAD
        assert await _greedy(shell) != ref[B]

        # use_prepared=False is the plain reload path (the benchmark's baseline).
        await shell.swap_in(A, dirs[A], use_prepared=False)
        assert shell.last_swap_path == RELOAD
        assert await _greedy(shell) == ref[A]
    finally:
        if shell is not None:
            shell.shutdown()
        cache.close()


def test_prepared_swaps_a_b_a_equal_fresh_engines(spec):
    asyncio.run(_scenario(spec))
