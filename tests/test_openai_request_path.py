"""OpenAI requests get the whole machinery: vLLM's serving layer runs at the
front door over resumable token streams, so an OpenAI request is preempted
on a time-shared device, moved by a migration and resumed after its engine
worker dies, and the client sees one uninterrupted response. Real Ray, real
vLLM on CPU, the ``openai`` client.

The reference for every answer is an uninterrupted run of the same
checkpoint on an engine of its own: ``ts-a``/``ts-b`` (the time-sharing
device's models, tests/conftest.py) are ``tiny-llama-a``/``-b``'s
checkpoints under other names.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from cluster.control.fleet import NAMESPACE, worker_actor_name
from tests.conftest import TIMESHARED_DEVICE
from tests.helpers import LONG_PROMPT, request_events, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.ray]

LONG = {"temperature": 0, "max_tokens": 450, "extra_body": {"ignore_eos": True}}
SHORT = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def dedicated(client):
    """What uninterrupted runs answer (on the accelerator nodes' engines)."""
    def text(model, **kw):
        return client.completions.create(model=model, prompt=LONG_PROMPT, **kw).choices[0]
    return {"a-long": text("tiny-llama-a", **LONG).text,
            "a-logprobs": text("tiny-llama-a", logprobs=2, **SHORT),
            "b-long": text("tiny-llama-b", **LONG).text}


@pytest.fixture(scope="module")
def timeshared(client, admin, dedicated):
    """ts-a and ts-b served by the time-sharing device: the first request
    places ts-a there, the second makes ts-b join its engine (the policy's
    "join" step: no memory, no engine of its own)."""
    for m in ("ts-a", "ts-b"):
        client.completions.create(model=m, prompt=LONG_PROMPT, **SHORT)
    status = admin.get("/admin/status").json()
    by_name = {m["name"]: m for m in status["models"]}
    assert by_name["ts-a"]["devices"] == by_name["ts-b"]["devices"] == {
        TIMESHARED_DEVICE: "timeshared"}
    return ray.get_actor(worker_actor_name(TIMESHARED_DEVICE), namespace=NAMESPACE)


def preemptions(worker) -> int:
    (group,) = ray.get(worker.stats.remote()).groups.values()
    return group.preemptions


def metric(front_door, name: str, **labels) -> float:
    text = httpx.get(f"{front_door['url']}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def stream_text(chunks) -> str:
    return "".join(c.choices[0].text for c in chunks if c.choices)


def in_thread(fn, *args, **kw) -> dict:
    """Run ``fn`` in a thread; the returned dict gets "result" (or "error")
    and "done_at" when it returns, and "thread"."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - the test asserts on it
            out["error"] = e
        out["done_at"] = time.monotonic()
    out["thread"] = threading.Thread(target=run)
    out["thread"].start()
    return out


# --- time-sharing --------------------------------------------------------------

def test_a_short_request_for_b_finishes_before_a_long_stream_for_a(client, timeshared, dedicated):
    """Token discipline: B's request does not wait for A's stream to end;
    A is preempted between decode steps and still answers exactly as alone."""
    before = preemptions(timeshared)
    stream = client.completions.create(model="ts-a", prompt=LONG_PROMPT, stream=True, **LONG)
    chunks = [next(stream)]
    b = in_thread(client.completions.create, model="ts-b", prompt=LONG_PROMPT, **SHORT)
    chunks += list(stream)
    a_done = time.monotonic()
    b["thread"].join()
    assert "error" not in b and b["result"].usage.completion_tokens == SHORT["max_tokens"]
    assert b["done_at"] < a_done  # B finished first
    assert stream_text(chunks) == dedicated["a-long"]
    assert preemptions(timeshared) > before  # A really gave up the engine for B


def test_n_stop_logprobs_and_usage_survive_preemptions(client, timeshared, dedicated):
    """While B streams, A's requests are preempted again and again: greedy
    logprobs, a stop string, n=2 and streamed usage still come out right."""
    before = preemptions(timeshared)
    b = in_thread(lambda: list(client.completions.create(
        model="ts-b", prompt=LONG_PROMPT, stream=True, **LONG)))
    ref = dedicated["a-logprobs"]
    got = client.completions.create(model="ts-a", prompt=LONG_PROMPT, logprobs=2, **SHORT)
    (choice,) = got.choices
    assert choice.text == ref.text and choice.logprobs.tokens == ref.logprobs.tokens
    assert choice.logprobs.token_logprobs == pytest.approx(ref.logprobs.token_logprobs, abs=1e-2)
    assert [set(t) for t in choice.logprobs.top_logprobs] == \
        [set(t) for t in ref.logprobs.top_logprobs]
    # A stop string from the middle of the long answer: found at the front
    # door over the whole text, whatever turns cut it into.
    full = dedicated["a-long"]
    stop = full[len(full) // 2:len(full) // 2 + 4]
    cut = client.completions.create(model="ts-a", prompt=LONG_PROMPT, stop=[stop], **LONG)
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # n=2, seeded sampling, usage in the stream: each child runs its full
    # budget, and usage counts every token once.
    n = 60
    chunks = list(client.completions.create(
        model="ts-a", prompt=LONG_PROMPT, n=2, temperature=0.8, seed=3, max_tokens=n,
        logprobs=1, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    per_choice = {0: [], 1: []}
    for c in chunks:
        for ch in c.choices:
            per_choice[ch.index].extend(ch.logprobs.tokens if ch.logprobs else [])
    assert [len(per_choice[i]) for i in (0, 1)] == [n, n]
    assert chunks[-1].usage.completion_tokens == 2 * n
    b["thread"].join()
    assert stream_text(b["result"]) == dedicated["b-long"]
    assert preemptions(timeshared) > before


def test_a_client_that_leaves_while_preempted_leaves_nothing_running(client, timeshared):
    """A's stream is closed while A and B take turns: A's request is gone
    from the scheduler and the engine; B's is untouched."""
    b = in_thread(lambda: list(client.completions.create(
        model="ts-b", prompt=LONG_PROMPT, stream=True, **LONG)))
    stream = client.completions.create(model="ts-a", prompt=LONG_PROMPT, stream=True, **LONG)
    next(stream)
    next(stream)
    stream.close()

    def a_gone():
        s = ray.get(timeshared.stats.remote())
        (group,) = s.groups.values()
        turns = group.models.get("ts-a")
        return s.models["ts-a"].running + s.models["ts-a"].waiting == 0 and (
            turns is None or turns.queued == turns.in_engine == 0)
    wait_until(a_gone, timeout_s=30)
    b["thread"].join()
    assert "error" not in b and b["result"][-1].choices[0].finish_reason == "length"
    s = ray.get(timeshared.stats.remote())
    assert all(sh.engine_unfinished == 0 for sh in s.shells.values())


# --- moves: migration, a dead worker ---------------------------------------------

def device_of(admin, model: str) -> str:
    (device,) = {m["name"]: m for m in admin.get("/admin/status").json()["models"]}[model][
        "devices"]
    return device


def test_requests_in_flight_move_with_an_admin_migration(client, admin, front_door, dedicated):
    """Streams and non-streaming requests run back to back while the admin
    API migrates the model: the ones caught by the move resume on the new
    copy, and every answer equals the uninterrupted one."""
    model = "tiny-llama-b"
    client.completions.create(model=model, prompt=LONG_PROMPT, **SHORT)  # active now
    source = device_of(admin, model)
    target = next(d["id"] for d in admin.get("/admin/status").json()["devices"]
                  if d["id"] != source and d["accelerator_type"])
    moved_before = metric(front_door, "shoal_request_resumes_total", model=model, cause="moved")
    migrated = in_thread(admin.post, f"/admin/models/{model}/migrate", json={"device": target})
    answers: list[tuple[str, str]] = []
    ids: list[str] = []  # X-Request-Id of each request, to follow it in the logs
    trace = f"mv-{uuid.uuid4().hex[:10]}"

    def loop(streaming: bool):
        while migrated["thread"].is_alive():
            ids.append(rid := f"{trace}-{len(ids)}-{int(streaming)}")
            headers = {"X-Request-Id": rid}
            if streaming:
                chunks = list(client.completions.create(
                    model=model, prompt=LONG_PROMPT, stream=True, extra_headers=headers,
                    stream_options={"include_usage": True}, **LONG))
                answers.append((stream_text(chunks), chunks[-1].usage.completion_tokens))
            else:
                out = client.completions.create(model=model, prompt=LONG_PROMPT,
                                                extra_headers=headers, **LONG)
                answers.append((out.choices[0].text, out.usage.completion_tokens))
    loops = [in_thread(loop, s) for s in (True, False)]
    for t in loops:
        t["thread"].join()
    assert "error" not in migrated and migrated["result"].status_code == 200
    assert migrated["result"].json()["devices"] == {target: "active"}
    assert all("error" not in t for t in loops), [t.get("error") for t in loops]
    assert answers and all(a == (dedicated["b-long"], LONG["max_tokens"]) for a in answers)
    moved = metric(front_door, "shoal_request_resumes_total", model=model, cause="moved")
    assert moved - moved_before >= 2  # the move caught both kinds in flight

    def followed(rid: str) -> bool:
        """The request's id on every step across the move: the worker on the
        source ends it ``moved``, the router resumes it on the target, the
        target's worker starts it from the tokens sent and finishes it, and
        the ingress finishes it 200."""
        ev = {(e["event"], e.get("device"), e.get("cause"), "resumed_from" in e, e.get("status"))
              for e in request_events(rid)}
        return {("moved", source, None, False, None), ("resumed", target, "moved", False, None),
                ("started", target, None, True, None), ("finished", None, None, False, "200"),
                ("accepted", None, None, False, None)} <= ev
    assert wait_until(lambda: any(followed(rid) for rid in ids), timeout_s=30)


def test_requests_survive_the_death_of_their_engine_worker(client, admin, dedicated):
    """The worker serving a stream, a non-streaming request with a stop
    string and an n=2 request with logprobs is killed: all resume on a new
    copy from the tokens already made. The stream's text and token count
    equal an uninterrupted run's, usage counted once; the stop string cuts
    where it would have; each of the n=2 samples runs its full budget."""
    model = "tiny-llama-a"
    client.completions.create(model=model, prompt=LONG_PROMPT, **SHORT)  # active now
    device = device_of(admin, model)
    full = dedicated["a-long"]
    stop = full[2 * len(full) // 3:2 * len(full) // 3 + 4]  # well after the kill
    cut = in_thread(client.completions.create, model=model, prompt=LONG_PROMPT, stop=[stop],
                    **LONG)
    pair = in_thread(client.completions.create, model=model, prompt=LONG_PROMPT, n=2,
                     temperature=0.8, seed=5, logprobs=1, max_tokens=LONG["max_tokens"],
                     extra_body={"ignore_eos": True})
    stream = client.completions.create(model=model, prompt=LONG_PROMPT, stream=True,
                                       stream_options={"include_usage": True}, **LONG)
    chunks = [next(stream) for _ in range(2)]
    ray.kill(ray.get_actor(worker_actor_name(device), namespace=NAMESPACE))
    chunks += list(stream)
    for t in (cut, pair):
        t["thread"].join()
        assert "error" not in t, t.get("error")
    assert stream_text(chunks) == full
    assert chunks[-1].usage.completion_tokens == LONG["max_tokens"]
    assert [c.choices[0].finish_reason for c in chunks
            if c.choices and c.choices[0].finish_reason] == ["length"]
    assert cut["result"].choices[0].text == full[:full.index(stop)]
    assert cut["result"].choices[0].finish_reason == "stop"
    samples = pair["result"]
    assert [len(c.logprobs.tokens) for c in samples.choices] == [LONG["max_tokens"]] * 2
    assert samples.usage.completion_tokens == 2 * LONG["max_tokens"]
    lost = [a for a in admin.get("/admin/status").json()["recent_actions"]
            if a["action"].startswith("WorkerLost")]
    assert lost and device in lost[-1]["action"]  # it really died mid-request


def test_a_client_that_leaves_during_a_move_leaves_nothing_running(client, admin):
    """The worker dies and the client hangs up while the request is being
    moved: once the model is back, no engine anywhere runs that request."""
    model = "tiny-llama-a"
    device = device_of(admin, model)
    stream = client.completions.create(model=model, prompt=LONG_PROMPT, stream=True, **LONG)
    next(stream)
    ray.kill(ray.get_actor(worker_actor_name(device), namespace=NAMESPACE))
    stream.close()
    client.completions.create(model=model, prompt=LONG_PROMPT, **SHORT)  # back in service
    workers = [ray.get_actor(worker_actor_name(d["id"]), namespace=NAMESPACE)
               for d in admin.get("/admin/status").json()["devices"]]

    def idle():
        stats = ray.get([w.stats.remote() for w in workers])
        return all((model not in s.models or s.models[model].running
                    + s.models[model].waiting == 0)
                   and all(sh.engine_unfinished == 0 for sh in s.shells.values())
                   for s in stats)
    wait_until(idle, timeout_s=30)
