"""The OpenAI front door end to end: the official ``openai`` client (sync,
async, streaming) against the real app on the 3-node test cluster, with
real vLLM engines on CPU. Every catalog model starts cold."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from cluster.control.fleet import NAMESPACE, worker_actor_name
from tests.helpers import LONG_PROMPT, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.ray]

GREEDY = {"temperature": 0, "max_tokens": 12}
CHAT = [{"role": "user", "content": LONG_PROMPT}]


def states(admin) -> dict[str, dict]:
    return {m["name"]: m for m in admin.get("/admin/status").json()["models"]}


def test_models_lists_every_catalog_model_cold_included(client, admin):
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert set(models) == {"tiny-llama-a", "tiny-llama-b", "tiny-llama-c", "tiny-qwen",
                           "needs-amd", "ts-a", "ts-b"}
    assert all(m["state"] == "cold" for m in models.values())  # nothing loaded yet
    assert models["tiny-qwen"]["family"] == "tiny-qwen"


def test_chat_cold_start_sync_and_streaming_agree(client, admin):
    """The first request loads the cold model; a streamed chat then yields
    the same greedy text, with usage."""
    out = client.chat.completions.create(model="tiny-llama-a", messages=CHAT, **GREEDY)
    assert out.model == "tiny-llama-a" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == GREEDY["max_tokens"] and out.usage.prompt_tokens > 20
    assert states(admin)["tiny-llama-a"]["state"] == "active"
    stream = client.chat.completions.create(model="tiny-llama-a", messages=CHAT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == GREEDY["max_tokens"]


def test_async_completions_on_a_second_cold_model_share_the_engine(front_door, admin):
    """tiny-llama-b is cold too: it joins A's engine by an in-place swap. With
    n=2, logprobs and stop as vLLM supports them."""
    async def go():
        c = openai.AsyncOpenAI(base_url=f"{front_door['url']}/v1", api_key="unused",
                               max_retries=0, timeout=300)
        sampled = dict(model="tiny-llama-b", prompt=LONG_PROMPT, n=2, logprobs=2, seed=7,
                       temperature=1.0, max_tokens=12)
        # Two wait for the cold model together (cold_queue_max is 2 here).
        both, single = await asyncio.gather(
            c.completions.create(**sampled),
            c.completions.create(model="tiny-llama-b", prompt=LONG_PROMPT, **GREEDY))
        return both, await c.completions.create(**sampled), single
    both, again, single = asyncio.run(go())
    assert len(both.choices) == 2 and all(ch.text for ch in both.choices)
    assert [ch.text for ch in both.choices] == [ch.text for ch in again.choices]  # seeded
    # the top 2, plus the sampled token when it is not among them
    assert 2 <= len(both.choices[0].logprobs.top_logprobs[0]) <= 3
    st = states(admin)
    assert st["tiny-llama-b"]["state"] == "active"
    assert set(st["tiny-llama-b"]["devices"]) == set(st["tiny-llama-a"]["devices"])
    stop = single.choices[0].text[3:6]
    cut = httpx.post(f"{front_door['url']}/v1/completions", timeout=300, json={
        "model": "tiny-llama-b", "prompt": LONG_PROMPT, "stop": [stop], **GREEDY}).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert stop not in cut["choices"][0]["text"]


def test_errors_use_the_openai_shape(client, front_door):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert "not in the catalog" in e.value.message
    bad = httpx.post(f"{front_door['url']}/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama-a", prompt="hi", temperature=-1)
    assert "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama-a", prompt="word " * 600, max_tokens=4)
    assert "context length" in e.value.message


def test_cold_start_queue_full_and_load_timeout_are_503_with_retry_after(front_door):
    """needs-amd can never be placed: two requests wait (cold_queue_max=2)
    and time out (its load_timeout_s=3), a third is refused at once."""
    async def go():
        async with httpx.AsyncClient(base_url=front_door["url"], timeout=60) as c:
            body = {"model": "needs-amd", "prompt": "hi", "max_tokens": 2}
            waiting = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(2)]
            await asyncio.sleep(1.0)
            refused = await c.post("/v1/completions", json=body)
            return refused, await asyncio.gather(*waiting)
    refused, timed_out = asyncio.run(go())
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert "cold_queue_max" in refused.json()["error"]["message"]
    for r in timed_out:
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "not ready within 3 s" in r.json()["error"]["message"]


def test_rate_limit_is_429(front_door):
    """tiny-llama-c allows 0.2 requests/s (burst 1): of two requests sent
    together, one is served and the other refused at once. (Sent one after
    the other, the second would pass on a machine slow enough for the first
    to take over 5 s: the bucket refills meanwhile.)"""
    async def both():
        async with openai.AsyncOpenAI(base_url=f"{front_door['url']}/v1", api_key="unused",
                                      max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(c.completions.create(
                model="tiny-llama-c", prompt="hi", max_tokens=2) for _ in range(2)),
                return_exceptions=True)
    results = asyncio.run(both())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(refused) == 1 and len(served) == 1, results
    assert int(refused[0].response.headers["retry-after"]) >= 1


def test_client_disconnect_aborts_the_engine_request(front_door, admin):
    body = {"model": "tiny-llama-a", "messages": CHAT, "stream": True, "temperature": 0,
            "max_tokens": 400}
    with httpx.stream("POST", f"{front_door['url']}/v1/chat/completions", json=body,
                      timeout=300) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
    assert any(g.startswith("data: ") for g in got)
    device = next(iter(states(admin)["tiny-llama-a"]["devices"]))
    worker = ray.get_actor(worker_actor_name(device), namespace=NAMESPACE)

    def idle():
        s = ray.get(worker.stats.remote())
        return s.models["tiny-llama-a"].running == 0 and all(
            sh.engine_unfinished == 0 for sh in s.shells.values())
    wait_until(idle, timeout_s=30)
    # The front door saw the client leave and cancelled the engine stream
    # (a 499), rather than the request simply running to its end.
    text = httpx.get(f"{front_door['url']}/metrics").text
    left = [s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "shoal_requests_total"
            and s.labels == {"model": "tiny-llama-a", "status": "499"}]
    assert left and left[0] >= 1


def test_admin_api(front_door, admin):
    anon = httpx.get(f"{front_door['url']}/admin/status")
    assert anon.status_code == 401 and "Bearer" in anon.json()["error"]["message"]
    st = admin.get("/admin/status").json()
    assert {d["accelerator_type"] for d in st["devices"]} == {"A100", "L4", None}
    assert all(d["memory_used_bytes"] <= d["memory_budget_bytes"] for d in st["devices"])
    assert admin.post("/admin/models/nope/load").status_code == 404
    loaded = admin.post("/admin/models/tiny-qwen/load")
    assert loaded.status_code == 200 and loaded.json()["state"] == "active"
    [source] = loaded.json()["devices"]
    target = next(d["id"] for d in st["devices"] if d["id"] != source and d["accelerator_type"])
    moved = admin.post("/admin/models/tiny-qwen/migrate", json={"device": target})
    assert moved.status_code == 200 and moved.json()["devices"] == {target: "active"}
    assert admin.post("/admin/models/tiny-qwen/migrate", json={}).status_code == 400
    gone = admin.post("/admin/models/tiny-qwen/unload")
    assert gone.status_code == 200 and gone.json()["state"] == "cold"


def test_metrics_scrape(front_door):
    text = httpx.get(f"{front_door['url']}/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0)
    assert value("shoal_requests_total", model="tiny-llama-a", status="200") >= 2
    assert value("shoal_ttft_seconds_count", model="tiny-llama-a") >= 1
    assert value("shoal_tpot_seconds_count", model="tiny-llama-a") >= 1
    assert value("shoal_requests_total", model="needs-amd", status="503") == 3
    assert value("shoal_control_actions_total", model="tiny-llama-a", action="load") >= 1
    assert value("shoal_control_actions_total", model="tiny-llama-b", action="swap") >= 1
    # the admin migration, plus any the policy made (consolidation) meanwhile
    assert value("shoal_control_actions_total", model="tiny-qwen", action="migrate") >= 1
    assert value("shoal_swap_seconds_count") >= 1
    assert value("shoal_queue_depth", model="needs-amd") == 0
    used = [k for k in samples if k[0] == "shoal_device_memory_budget_bytes"]
    assert len(used) == 3  # A100, L4 and the time-sharing CPU device
