"""The OpenAI front door end to end: the official ``openai`` client (sync,
async, streaming) against the real app on the 3-node test cluster, with
real vLLM engines on CPU. Every catalog model starts cold."""

from __future__ import annotations

import asyncio
import json
import uuid

import grpc
import httpx
import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from cluster.control.fleet import NAMESPACE, worker_actor_name
from serve_apps import shoal_pb2, shoal_pb2_grpc
from tests.conftest import ADMIN_KEY, SUITE_KEY, TENANT_KEYS, WRONG_KEY
from tests.helpers import (LONG_PROMPT, exported_metric_names, request_events,
                           session_log_files, wait_until)
from tests.test_ray_configs import dashboard_metric_names

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
        c = openai.AsyncOpenAI(base_url=f"{front_door['url']}/v1", api_key=SUITE_KEY,
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
        async with openai.AsyncOpenAI(base_url=f"{front_door['url']}/v1", api_key=SUITE_KEY,
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


def test_every_dashboard_query_reads_a_metric_the_front_door_exports(front_door):
    """ray_configs/grafana-shoal.json against a live scrape."""
    text = httpx.get(f"{front_door['url']}/metrics").text
    missing = dashboard_metric_names() - exported_metric_names(text)
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"


# ------------------------------------------------------------------ tenants
def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def tenant_samples(front_door, tenant: str) -> dict[tuple[str, str], float]:
    """(metric, status or direction) -> value for one tenant."""
    text = httpx.get(f"{front_door['url']}/metrics").text
    return {(s.name, s.labels.get("status") or s.labels.get("direction")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("shoal_tenant_") and s.name.endswith("_total")
            and s.labels.get("tenant") == tenant}


def test_tenant_keys_visible_models_and_concurrency(front_door):
    """A wrong key is 401 in the OpenAI shape; ``solo`` sees only
    tiny-llama-a (others are 404 exactly like unknown models, and left out
    of /v1/models); its second request while one is in flight is 429, and
    the slot comes back when the first client leaves."""
    url = front_door["url"]
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key=WRONG_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model="tiny-llama-a", prompt="hi", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["type"] == "invalid_api_key"
    solo = openai.OpenAI(base_url=f"{url}/v1", api_key=TENANT_KEYS["solo"], max_retries=0,
                         timeout=300)
    assert [m.id for m in solo.models.list().data] == ["tiny-llama-a"]
    body = {"prompt": "hi", "max_tokens": 2}
    hidden = httpx.post(f"{url}/v1/completions", headers=bearer(TENANT_KEYS["solo"]),
                        json={"model": "tiny-llama-b", **body})
    unknown = httpx.post(f"{url}/v1/completions", headers=bearer(TENANT_KEYS["solo"]),
                         json={"model": "no-such-model", **body})
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json() == json.loads(unknown.text.replace("no-such-model", "tiny-llama-b"))

    before = tenant_samples(front_door, "solo")
    long = {"model": "tiny-llama-a", "prompt": LONG_PROMPT, "max_tokens": 400, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=300,
                      headers=bearer(TENANT_KEYS["solo"])) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        refused = httpx.post(f"{url}/v1/completions", headers=bearer(TENANT_KEYS["solo"]),
                             json={"model": "tiny-llama-a", **body})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "max_concurrent" in refused.json()["error"]["message"]
    # The client left mid-stream: its slot is freed and its tokens counted.
    wait_until(lambda: tenant_samples(front_door, "solo").get(
        ("shoal_tenant_requests_total", "499"), 0) > before.get(
        ("shoal_tenant_requests_total", "499"), 0), timeout_s=30)
    out = solo.completions.create(model="tiny-llama-a", prompt="hi", max_tokens=3)
    after = tenant_samples(front_door, "solo")
    assert after[("shoal_tenant_requests_total", "429")] >= 1
    assert after[("shoal_tenant_requests_total", "404")] >= 1
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert grew[("shoal_tenant_tokens_total", "out")] > out.usage.completion_tokens  # + the 499's
    assert grew[("shoal_tenant_tokens_total", "in")] > out.usage.prompt_tokens


def test_tenant_tokens_per_minute_counts_streamed_usage_and_refuses_the_next(front_door):
    """``thrifty`` may use 10 tokens a minute: its first (streamed) request
    runs to the end and takes it over; the counters equal the usage vLLM
    reported; the next request is 429 with a Retry-After within the minute."""
    url = front_door["url"]
    thrifty = openai.OpenAI(base_url=f"{url}/v1", api_key=TENANT_KEYS["thrifty"],
                            max_retries=0, timeout=300)
    chunks = list(thrifty.completions.create(model="tiny-llama-a", prompt=LONG_PROMPT,
                                             max_tokens=8, stream=True, temperature=0,
                                             stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.completion_tokens == 8
    with pytest.raises(openai.RateLimitError) as e:
        thrifty.completions.create(model="tiny-llama-a", prompt="hi", max_tokens=2)
    assert "tokens per minute" in e.value.message
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    got = tenant_samples(front_door, "thrifty")
    assert got[("shoal_tenant_tokens_total", "in")] == usage.prompt_tokens
    assert got[("shoal_tenant_tokens_total", "out")] == usage.completion_tokens
    assert got[("shoal_tenant_requests_total", "200")] == 1
    assert got[("shoal_tenant_requests_total", "429")] == 1


def test_keys_never_reach_logs_bodies_or_metrics_and_one_id_follows_a_request(front_door):
    """Requests with every kind of key (valid, wrong, the admin key on an
    OpenAI route, a tenant key on an admin route; HTTP and gRPC), then every
    response body, the /metrics scrape and every log file of the Ray session
    are searched for the keys: none appears. The same requests' ids are in
    the ingress's, the router's and the worker's log lines."""
    url = front_door["url"]
    keys = [SUITE_KEY, WRONG_KEY, ADMIN_KEY, *TENANT_KEYS.values()]
    trace = f"trace-{uuid.uuid4().hex[:12]}"
    bodies = []
    for key in keys:
        for path, body in (("/v1/completions", {"model": "tiny-llama-a", "prompt": "hi",
                                                 "max_tokens": 2}),
                           ("/v1/completions", {"model": "nope", "prompt": "hi"}),
                           ("/v1/chat/completions", "{not json")):
            kw = {"json": body} if isinstance(body, dict) else {"content": body}
            r = httpx.post(f"{url}{path}", timeout=300, headers={
                **bearer(key), "X-Request-Id": f"{trace}-{len(bodies)}"}, **kw)
            bodies.append(r.text)
        bodies.append(httpx.get(f"{url}/v1/models", headers=bearer(key)).text)
        status = httpx.get(f"{url}/admin/status", headers=bearer(key))
        assert status.status_code == (200 if key == ADMIN_KEY else 401)  # no client key is admin
        bodies.append(status.text)
    assert json.loads(bodies[0])["choices"]  # the suite's key was served
    with grpc.insecure_channel(front_door["grpc"]) as channel:
        stub = shoal_pb2_grpc.ShoalStub(channel)
        solo = (("application", "shoal"), ("authorization", f"Bearer {TENANT_KEYS['solo']}"))
        listed = stub.ListModels(shoal_pb2.ListModelsRequest(), metadata=solo, timeout=60)
        assert [m.name for m in listed.models] == ["tiny-llama-a"]
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(shoal_pb2.GenerateRequest(model="tiny-llama-b", prompt="hi"),
                               metadata=solo, timeout=60))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        bodies.append(e.value.details())
        with pytest.raises(grpc.RpcError) as e:
            stub.ListModels(shoal_pb2.ListModelsRequest(), timeout=60, metadata=(
                ("application", "shoal"), ("authorization", f"Bearer {WRONG_KEY}")))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        bodies.append(e.value.details())
    assert sum(b.count("invalid_api_key") for b in bodies) >= 3  # the wrong key's 401s
    bodies.append(httpx.get(f"{url}/metrics").text)
    for key in keys:
        assert not [b for b in bodies if key in b], f"a key in a response body: {key}"

    # The suite key's completion: accepted and finished (200) at the
    # ingress, routed by the router, started and finished on the worker.
    want = {"accepted", "routed", "started", "finished"}

    def logged():
        ev = request_events(f"{trace}-0")
        return ev if want <= {e["event"] for e in ev} else None
    events = wait_until(logged, timeout_s=30)
    assert {e["status"] for e in events if e["event"] == "finished" and "status" in e} == {"200"}
    assert {e["tenant"] for e in events if "tenant" in e} == {"suite"}
    leaked = []
    for f in session_log_files():
        data = f.read_bytes()
        leaked += [(f.name, k) for k in keys if k.encode() in data]
    assert not leaked, f"keys in the session's logs: {leaked}"
