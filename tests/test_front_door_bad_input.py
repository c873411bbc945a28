"""Bad input against the live front door (issue 13, "Bad input").

A hypothesis fuzzer drives the HTTP API with broken bodies and headers;
raw-socket clients hold thousands of idle connections and hang up at every
stage of a request. Whatever comes in: no 5xx, every error an OpenAI-shaped
body that carries no internals (tracebacks, actor ids, pids, addresses), no
request left running in an engine, and the server healthy and serving
afterwards. Only ``tiny-llama-a`` is ever sent to an engine (it is active
after ``test_front_door.py``), with tiny ``max_tokens``, so the other
front-door tests find the cluster as they expect it.
"""

from __future__ import annotations

import json
import re
import resource
import socket
import time
from urllib.parse import quote, urlsplit

import httpx
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.control.fleet import NAMESPACE, worker_actor_name
from tests.conftest import ADMIN_KEY
from tests.helpers import LONG_PROMPT, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.ray]

MODEL = "tiny-llama-a"
CHAT_BASE = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION_BASE = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
# What a client must never see in an error: Python or Ray internals.
INTERNALS = re.compile(r"Traceback|ActorID|actor_id|pid=|ray::|File \"|RayTaskError|"
                       r"RayActorError|/site-packages/")
IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
PATH_LIKE = ["../../etc/passwd", "/etc/passwd", f"{MODEL}/../x", f"../{MODEL}",
             quote("../../etc/passwd", safe=""), "%2e%2e%2fetc%2fpasswd", "file:///etc/passwd",
             f"{MODEL}\x00", "~/.ssh/id_rsa", "C:\\Windows\\win.ini", ".", "..", "",
             f"{MODEL} ", MODEL.upper()]
HUGE = [2**31, 2**63, 10**30, -1, -(2**63), 0]


def check_error(resp: httpx.Response, sent: bytes | str = b"") -> None:
    """A refusal: under 500, OpenAI-shaped, no internals (an IPv4 address
    only where the client sent it)."""
    sent = sent.decode("utf-8", "replace") if isinstance(sent, bytes) else sent
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    body = resp.json()
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["code"] == resp.status_code, body
    assert not INTERNALS.search(resp.text), resp.text[:1000]
    for ip in IPV4.findall(resp.text):
        assert ip in sent, f"{ip} in {resp.text[:500]}"


def check_served_or_refused(resp: httpx.Response, sent: bytes | str = b"") -> None:
    if resp.status_code == 200:
        ctype = resp.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            assert "error" not in resp.json()
        else:
            assert ctype.startswith("text/event-stream"), ctype
            assert not INTERNALS.search(resp.text), resp.text[:1000]
        return
    check_error(resp, sent)


def engine_idle(front_door) -> bool:
    """No request of MODEL running or waiting in any engine that holds it."""
    status = ray.get(front_door["controller"].status.remote())
    devices = next(m for m in status["models"] if m["name"] == MODEL)["devices"]
    for device in devices:
        s = ray.get(ray.get_actor(worker_actor_name(device), namespace=NAMESPACE).stats.remote())
        m = s.models.get(MODEL)
        if (m is not None and m.running + m.waiting) or any(
                sh.engine_unfinished for sh in s.shells.values()):
            return False
    return True


def assert_healthy(url: str) -> None:
    """/health is ok and a normal request is served, quickly."""
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").json() == {"status": "ok"}
        t0 = time.monotonic()
        ok = c.post("/v1/completions", json=COMPLETION_BASE)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None, ok.text
        assert time.monotonic() - t0 < 10


@pytest.fixture(scope="module")
def door(front_door):
    """The front door with MODEL active (loaded here if this file runs alone)."""
    with httpx.Client(base_url=front_door["url"], timeout=300) as c:
        assert c.post("/v1/completions", json=COMPLETION_BASE).status_code == 200
    return front_door


# ------------------------------------------------------------------ the fuzzer
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=8), kids, max_size=3)),
    max_leaves=6)
numbers = st.one_of(st.sampled_from(HUGE + [0.0, -0.5, 1e308, float("nan"), float("inf")]),
                    st.integers(-(2**64), 2**64), st.floats(allow_nan=True), st.text(max_size=5),
                    st.none())
roles = st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer",
                                   "function", "root", "", "USER"]), st.text(max_size=10))
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": roles, "content": st.text(max_size=30)}),
             max_size=3),
    st.lists(st.fixed_dictionaries({"role": st.just("user")}), min_size=1, max_size=2),
    st.lists(json_values, max_size=3),
    st.just([{"role": "user", "content": [{"type": "image_url",
                                           "image_url": {"url": "file:///etc/passwd"}}]}]),
    st.just([{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    json_values,
)
# (field, values): every field vLLM's OpenAI requests read, with bad values.
FIELDS = {
    "model": st.one_of(st.sampled_from(PATH_LIKE), st.text(max_size=30), json_values),
    "messages": messages,
    "prompt": st.one_of(
        st.just("word " * 3000),  # far beyond the 512-token context
        st.lists(st.integers(-5, 10**6), max_size=4),  # token ids, most out of vocabulary
        st.just([[1, 2], [3]]), st.just([]), st.just(""), st.just([""]), json_values),
    "max_tokens": numbers, "max_completion_tokens": numbers, "min_tokens": numbers,
    "n": st.one_of(st.sampled_from([0, -1, 10**6, 2**40, 64]), numbers),
    "best_of": numbers, "temperature": numbers, "top_p": numbers, "top_k": numbers,
    "min_p": numbers, "presence_penalty": numbers, "frequency_penalty": numbers,
    "repetition_penalty": numbers, "seed": numbers, "logprobs": st.one_of(numbers,
                                                                          st.booleans()),
    "top_logprobs": numbers, "prompt_logprobs": numbers,
    "length_penalty": numbers, "truncate_prompt_tokens": numbers,
    "stop": st.one_of(st.lists(st.text(max_size=3), max_size=5), json_values),
    "stop_token_ids": st.one_of(st.lists(st.integers(-(2**40), 2**40), max_size=3), json_values),
    "logit_bias": st.one_of(st.dictionaries(st.text(max_size=8), numbers, max_size=3),
                            json_values),
    "allowed_token_ids": st.one_of(st.lists(st.integers(-5, 10**9), max_size=3), json_values),
    "bad_words": st.one_of(st.lists(st.text(max_size=5), max_size=3), json_values),
    "stream": json_values, "stream_options": json_values, "echo": json_values,
    "response_format": st.one_of(json_values, st.just({"type": "json_schema"}),
                                 st.just({"type": "json_schema", "json_schema": {
                                     "name": "x", "schema": {"type": "nope"}}}),
                                 st.just({"type": "json_object"})),
    "structured_outputs": st.one_of(json_values, st.just({"regex": "("}),
                                    st.just({"grammar": "root ::= (("}),
                                    st.just({"choice": []})),
    "tools": json_values, "tool_choice": json_values, "functions": json_values,
    "chat_template": st.sampled_from(["/etc/passwd", "{{ raise_exception('x') }}",
                                      "{% include '/etc/passwd' %}"]),
    "chat_template_kwargs": st.one_of(json_values, st.just({"chat_template": "/etc/passwd"})),
    "add_generation_prompt": json_values, "continue_final_message": json_values,
    "documents": json_values, "mm_processor_kwargs": json_values,
    "prompt_embeds": st.sampled_from(["AAAA", "not base64!", ""]),
    "logits_processors": st.just(["os.system"]), "request_id": json_values,
    "priority": numbers, "kv_transfer_params": json_values, "vllm_xargs": json_values,
    "cache_salt": json_values, "user": st.one_of(st.just("x" * 10000), json_values),
    "suffix": json_values, "return_tokens_as_token_ids": json_values,
}
RAW_BODIES = [b"", b"{", b"{not json", b"null", b"[]", b'"x"', b"1e999", b"[" * 50000,
              b'{"model": "\xff\xfe"}', b"\xff\xfe\xfd", b'{"model": "tiny-llama-a", '
              b'"prompt": "\xc3\x28", "max_tokens": 2}', b'{"model": 1}',
              b'{"model": "tiny-llama-a", "max_tokens": 2, "prompt": "a", "prompt": 5}',
              b'{"model": "tiny-llama-a", "max_tokens": NaN, "prompt": "a"}',
              b'{"model": "tiny-llama-a", "max_tokens": Infinity, "prompt": "a"}']
CONTENT_TYPES = ["application/json", "text/plain", "", "application/json; charset=latin-1",
                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"]


@st.composite
def openai_requests(draw):
    """(path, body bytes, headers) for one bad request to an OpenAI route."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if draw(st.integers(0, 9)) == 0:
        body = draw(st.one_of(st.sampled_from(RAW_BODIES), st.binary(max_size=40)))
    else:
        body = dict(CHAT_BASE if chat else COMPLETION_BASE)
        for field in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3,
                                   unique=True)):
            if draw(st.integers(0, 5)) == 0:
                body.pop(field, None)  # missing
            else:
                body[field] = draw(FIELDS[field])
        # Whatever reaches the engine stays short.
        if isinstance(body.get("max_tokens"), int) and 0 < body["max_tokens"] <= 8:
            pass
        elif "max_tokens" not in body or draw(st.booleans()):
            body["max_tokens"] = 2
        body = json.dumps(body, allow_nan=True).encode()
    headers = {"content-type": draw(st.sampled_from(CONTENT_TYPES))}
    if draw(st.booleans()):
        headers[draw(st.sampled_from(["x-request-id", "authorization", "accept",
                                      "openai-organization", "x-shoal-junk"]))] = \
            draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                         max_size=40))  # what HTTP allows in a header value
    return path, body, headers


FUZZ_STATUSES: list[int] = []  # what the fuzzer got: it must reach the engines too


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(case=openai_requests())
def test_fuzzed_openai_requests_get_no_5xx_and_no_internals(door, case):
    path, body, headers = case
    with httpx.Client(base_url=door["url"], timeout=60) as c:
        resp = c.post(path, content=body, headers=headers)
    FUZZ_STATUSES.append(resp.status_code)
    check_served_or_refused(resp, body)


LONG = "word " * 3000  # far beyond tiny-llama-a's 512-token context
# Each case the issue lists, with what it must get: 400 (or 404 for an
# unknown model), or 200 where vLLM serves it (an empty message list, an
# unknown role: the chat template renders them; max_tokens 0 means none).
NAMED = [
    ("malformed JSON", "c", b'{"model": "tiny-llama-a", "prompt": ', {400}),
    ("invalid UTF-8 in a string", "c", b'{"model": "tiny-llama-a", "prompt": "\xc3\x28", '
                                          b'"max_tokens": 2}', {400}),
    ("invalid UTF-8 in the model", "c", b'{"model": "\xff\xfe", "prompt": "a"}', {400}),
    ("not an object", "chat", b"[1, 2]", {400}),
    ("model of the wrong type", "c", {"model": ["tiny-llama-a"], "prompt": "a"}, {400}),
    ("prompt of the wrong type", "c", {**COMPLETION_BASE, "prompt": {"a": 1}}, {400}),
    ("messages of the wrong type", "chat", {**CHAT_BASE, "messages": "hi"}, {400}),
    ("content of the wrong type", "chat", {**CHAT_BASE, "messages": [
        {"role": "user", "content": 5}]}, {400}),
    ("max_tokens of the wrong type", "c", {**COMPLETION_BASE, "max_tokens": "many"}, {400}),
    ("missing model", "c", {"prompt": "a", "max_tokens": 2}, {400}),
    ("missing prompt", "c", {"model": MODEL, "max_tokens": 2}, {400}),
    ("missing messages", "chat", {"model": MODEL, "max_tokens": 2}, {400}),
    ("missing role", "chat", {**CHAT_BASE, "messages": [{"content": "hi"}]}, {400}),
    ("empty model", "c", {**COMPLETION_BASE, "model": ""}, {404}),
    ("empty prompt", "c", {**COMPLETION_BASE, "prompt": ""}, {200, 400}),
    ("empty messages", "chat", {**CHAT_BASE, "messages": []}, {200, 400}),
    ("empty body", "chat", b"", {400}),
    ("unknown role", "chat", {**CHAT_BASE, "messages": [{"role": "root", "content": "hi"}]},
     {200, 400}),
    ("negative max_tokens", "c", {**COMPLETION_BASE, "max_tokens": -1}, {400}),
    ("zero max_tokens", "c", {**COMPLETION_BASE, "max_tokens": 0}, {200, 400}),
    ("huge max_tokens", "c", {**COMPLETION_BASE, "max_tokens": 10**9}, {400}),
    ("max_tokens past int64", "c", {**COMPLETION_BASE, "max_tokens": 2**70}, {400}),
    ("prompt beyond the context", "c", {**COMPLETION_BASE, "prompt": LONG}, {400}),
    ("chat beyond the context", "chat", {**CHAT_BASE, "messages": [
        {"role": "user", "content": LONG}]}, {400}),
    ("token ids beyond the vocabulary", "c", {**COMPLETION_BASE, "prompt": [10**6, 3]}, {400}),
    ("negative token ids", "c", {**COMPLETION_BASE, "prompt": [-1, 3]}, {400}),
    ("huge n", "c", {**COMPLETION_BASE, "n": 10**6}, {400}),
    ("zero n", "c", {**COMPLETION_BASE, "n": 0}, {400}),
    ("unknown model", "c", {**COMPLETION_BASE, "model": "no-such-model"}, {404}),
    ("temperature below 0", "c", {**COMPLETION_BASE, "temperature": -1}, {400}),
    ("top_p above 1", "c", {**COMPLETION_BASE, "top_p": 2}, {400}),
    ("top_p 0", "c", {**COMPLETION_BASE, "top_p": 0}, {400}),
    ("top_k below -1", "c", {**COMPLETION_BASE, "top_k": -5}, {400}),
    ("min_p above 1", "c", {**COMPLETION_BASE, "min_p": 2}, {400}),
    ("presence_penalty past 2", "c", {**COMPLETION_BASE, "presence_penalty": 100}, {400}),
    ("repetition_penalty 0", "c", {**COMPLETION_BASE, "repetition_penalty": 0}, {400}),
    ("logprobs too many", "c", {**COMPLETION_BASE, "logprobs": 10**6}, {400}),
    ("top_logprobs without logprobs", "chat", {**CHAT_BASE, "top_logprobs": 5}, {400}),
    ("seed past int64", "c", {**COMPLETION_BASE, "seed": 2**70}, {400}),
    ("logit_bias on a bad token", "c", {**COMPLETION_BASE, "logit_bias": {"x": 1}}, {400}),
    ("logit_bias out of the vocabulary", "c", {**COMPLETION_BASE,
                                               "logit_bias": {"99999999": 1}}, {400}),
    ("allowed_token_ids out of the vocabulary", "c", {**COMPLETION_BASE,
                                                      "allowed_token_ids": [10**9]}, {400}),
    ("min_tokens above max_tokens", "c", {**COMPLETION_BASE, "min_tokens": 5}, {400}),
    ("json_schema without a schema", "c", {**COMPLETION_BASE,
                                           "response_format": {"type": "json_schema"}}, {400}),
    ("a broken regex", "c", {**COMPLETION_BASE, "structured_outputs": {"regex": "("}}, {400}),
]


@pytest.mark.parametrize("name, kind, body, allowed", NAMED, ids=[n[0] for n in NAMED])
def test_each_named_bad_input_gets_its_status(door, name, kind, body, allowed):
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=door["url"], timeout=60) as c:
        resp = c.post(path, content=raw, headers={"content-type": "application/json"})
    assert resp.status_code in allowed, (name, resp.status_code, resp.text[:300])
    check_served_or_refused(resp, raw)


ADMIN_NAMES = PATH_LIKE[:6] + ["nope", "x" * 300, "%00", "tiny-llama-a%2F..%2Fx"]


@st.composite
def admin_requests(draw):
    verb = draw(st.sampled_from(["load", "unload", "migrate"]))
    name = draw(st.one_of(st.sampled_from(ADMIN_NAMES), st.text(
        st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#"),
        min_size=1, max_size=20)))
    body = draw(st.one_of(st.sampled_from(RAW_BODIES[:6]), json_values.map(
        lambda v: json.dumps({"device": v}).encode())))
    auth = draw(st.sampled_from([f"Bearer {ADMIN_KEY}", "", "Bearer", "Bearer wrong",
                                 "Basic Zm9vOmJhcg=="]))
    return f"/admin/models/{quote(name, safe='%')}/{verb}", body, auth


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(case=admin_requests())
def test_fuzzed_admin_requests_for_unknown_models_get_no_5xx(door, case):
    """Unknown models only (a known one would really load or move)."""
    path, body, auth = case
    with httpx.Client(base_url=door["url"], timeout=60) as c:
        resp = c.post(path, content=body, headers={"authorization": auth} if auth else {})
    assert resp.status_code in (400, 401, 404, 405), (path, resp.status_code, resp.text[:300])
    check_error(resp, body)


def test_bad_admin_bodies_for_a_known_model_are_400_and_change_nothing(door):
    h = {"authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=door["url"], timeout=60, headers=h) as c:
        before = c.get("/admin/status").json()["models"]
        for device in ([1], {"a": 1}, 5, True, "no-such-device", "../../etc"):
            for verb in ("load", "migrate"):
                resp = c.post(f"/admin/models/{MODEL}/{verb}", json={"device": device})
                assert resp.status_code in (400, 404), (verb, device, resp.text)
                check_error(resp, json.dumps(device))
        for raw in (b"{", b"[]", b"\xff", b'"device"'):  # not "no body": no load anywhere
            for verb in ("load", "migrate"):
                resp = c.post(f"/admin/models/{MODEL}/{verb}", content=raw)
                assert resp.status_code == 400, (verb, raw, resp.text)
                check_error(resp)
        after = c.get("/admin/status").json()["models"]
    state = {m["name"]: (m["state"], m["devices"]) for m in before}
    assert {m["name"]: (m["state"], m["devices"]) for m in after} == state


def test_other_routes_with_bad_input_answer_in_the_openai_shape(door):
    with httpx.Client(base_url=door["url"], timeout=60) as c:
        for method, path in [("GET", "/v1/models?limit=-1&x=%ff"), ("POST", "/v1/models"),
                             ("GET", "/v1/chat/completions"), ("GET", "/no/such/route"),
                             ("GET", "/v1/models/../../etc/passwd"), ("DELETE", "/health"),
                             ("GET", "/admin/status")]:
            resp = c.request(method, path, content=b"\xff{")
            if resp.status_code == 200:
                assert method == "GET" and path.startswith("/v1/models?"), path
                assert {m["id"] for m in resp.json()["data"]} >= {MODEL}
            else:
                check_error(resp)


def test_after_the_fuzzing_the_server_is_healthy_and_nothing_runs(door):
    # The fuzzer reached the engines as well as the validators.
    assert sum(s == 200 for s in FUZZ_STATUSES) >= 20, FUZZ_STATUSES
    assert sum(400 <= s < 500 for s in FUZZ_STATUSES) >= 100, FUZZ_STATUSES
    wait_until(lambda: engine_idle(door), timeout_s=30)
    assert_healthy(door["url"])


# --------------------------------------------------------- paths and templates
def test_path_like_model_names_are_404_and_read_no_file(door, tmp_path):
    """A model name is looked up in the catalog, never on disk: names that
    point at a real checkpoint directory, or at a file, are 404 all the same
    (the checkpoint path would load as a model if the name reached vLLM)."""
    checkpoint = door["catalog"]["models"][0]["path"]
    sentinel = tmp_path / "sentinel.json"
    sentinel.write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    names = PATH_LIKE + [checkpoint, str(sentinel), str(tmp_path), f"{checkpoint}/../x"]
    with httpx.Client(base_url=door["url"], timeout=60) as c:
        for name in names:
            for path, base in [("/v1/completions", COMPLETION_BASE),
                               ("/v1/chat/completions", CHAT_BASE)]:
                resp = c.post(path, json={**base, "model": name})
                assert resp.status_code in (400, 404), (name, resp.status_code)
                check_error(resp, name)
    models = httpx.get(f"{door['url']}/v1/models").json()["data"]
    assert {m["id"] for m in models} == {m["name"] for m in door["catalog"]["models"]}


def test_request_supplied_chat_templates_and_files_are_refused(door, tmp_path):
    """vLLM's --trust-request-chat-template stays off at the front door, and
    local media and prompt embeddings stay disabled: a template, a template
    path, a file URL or pickled tensors in a request are refused, and the
    sentinel file the template would render is never opened."""
    sentinel = tmp_path / "template.jinja"
    sentinel.write_text("SENTINEL {{ messages }}")
    opened = sentinel.stat().st_atime_ns
    time.sleep(0.05)
    refused = [
        {**CHAT_BASE, "chat_template": str(sentinel)},
        {**CHAT_BASE, "chat_template": "SENTINEL {{ messages }}"},
        {**CHAT_BASE, "chat_template_kwargs": {"chat_template": str(sentinel)}},
        {**CHAT_BASE, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": sentinel.as_uri()}}]}]},
        {**COMPLETION_BASE, "prompt_embeds": "gASVAAAAAAAAAAA="},
    ]
    # A media URL on this machine: nothing may connect to it (no fetches
    # on a client's behalf).
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"
    refused.append({**CHAT_BASE, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]})
    try:
        with httpx.Client(base_url=door["url"], timeout=60) as c:
            for body in refused:
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                resp = c.post(path, json=body)
                assert resp.status_code == 400, (body, resp.status_code, resp.text[:300])
                check_error(resp, json.dumps(body))
                assert "SENTINEL" not in resp.text
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody came
    finally:
        listener.close()
    assert sentinel.stat().st_atime_ns == opened, "the front door opened a file a request named"


# ------------------------------------------------------------ raw connections
def raw_socket(url: str) -> socket.socket:
    u = urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    return s


def http_request(body: bytes, path: str = "/v1/chat/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_thousands_of_idle_connections_do_not_stop_service(door):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2000
    if soft < want + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want + 500), hard))
    n = min(want, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200)
    assert n >= 1000, "the file-descriptor limit is too low for this test"
    u = urlsplit(door["url"])
    idle = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.settimeout(10)
            s.connect((u.hostname, u.port))
            idle.append(s)
        for s in idle[::2]:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # half a header
        time.sleep(1.0)
        assert_healthy(door["url"])
    finally:
        for s in idle:
            s.close()
    assert_healthy(door["url"])


BIG = {**CHAT_BASE, "messages": [{"role": "user", "content": LONG_PROMPT}], "temperature": 0,
       "max_tokens": 400}


@pytest.mark.parametrize("stage", ["partial-header", "partial-body", "before-response",
                                   "mid-stream"])
def test_a_client_that_hangs_up_at_any_stage_leaves_nothing_running(door, stage):
    body = json.dumps({**BIG, "stream": stage == "mid-stream"}).encode()
    raw = http_request(body)
    s = raw_socket(door["url"])
    try:
        if stage == "partial-header":
            s.sendall(raw[:30])
        elif stage == "partial-body":
            s.sendall(raw[:-len(body) // 2])
        elif stage == "before-response":
            s.sendall(raw)
            time.sleep(0.3)  # the request is with the engine by now
        else:
            s.sendall(raw)
            got = b""
            while got.count(b"data: ") < 3:
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
            assert b" 200 OK" in got.split(b"\r\n", 1)[0]
    finally:
        s.close()
    wait_until(lambda: engine_idle(door), timeout_s=30)
    assert_healthy(door["url"])
