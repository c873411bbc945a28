"""The resumable OpenAI path (the default): vLLM's serving layer at the
front door over Shoal's token streams, against the engine-side layer
(``resumable_openai: false``) on the same models, real vLLM on CPU, the
``openai`` client.

A second ingress ("/e", engine-side) serves the same catalog through the
same controller as the ``front_door`` app, so both paths meet the same
engines.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import ray

from tests.conftest import ADMIN_KEY
from tests.helpers import LONG_PROMPT

pytestmark = [pytest.mark.engine, pytest.mark.ray]

MODEL = "tiny-llama-a"
GREEDY = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def urls(front_door):
    from ray import serve

    from serve_apps.app import build_app

    serve.run(build_app({"catalog": front_door["catalog"], "admin_key": ADMIN_KEY,
                         "resumable_openai": False}), name="shoal-e", route_prefix="/e")
    yield {"old": f"{front_door['url']}/e/v1", "new": f"{front_door['url']}/v1",
           "admin": front_door["url"]}
    serve.delete("shoal-e")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)


def test_same_answers_as_the_engine_side_layer(urls):
    old, new = client(urls["old"]), client(urls["new"])
    a = old.completions.create(model=MODEL, prompt=LONG_PROMPT, **GREEDY)
    b = new.completions.create(model=MODEL, prompt=LONG_PROMPT, **GREEDY)
    assert b.choices[0].text == a.choices[0].text and a.choices[0].text
    assert b.usage.completion_tokens == a.usage.completion_tokens == GREEDY["max_tokens"]
    assert b.usage.prompt_tokens == a.usage.prompt_tokens
    chat = [{"role": "user", "content": LONG_PROMPT}]
    whole = old.chat.completions.create(model=MODEL, messages=chat, **GREEDY)
    stream = new.chat.completions.create(model=MODEL, messages=chat, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_stop_and_logprobs_behave_as_vllm(urls):
    old, new = client(urls["old"]), client(urls["new"])
    # n=2 (vLLM refuses it greedy): seeded sampling, each child seed + i on
    # both paths, with logprobs.
    kw = {"model": MODEL, "prompt": LONG_PROMPT, "n": 2, "temperature": 0.8, "seed": 7,
          "max_tokens": 24, "logprobs": 2}
    a, b = old.completions.create(**kw), new.completions.create(**kw)
    assert [c.text for c in b.choices] == [c.text for c in a.choices]
    assert b.choices[0].text != b.choices[1].text  # two samples, not one twice
    for ca, cb in zip(a.choices, b.choices):
        assert cb.logprobs.tokens == ca.logprobs.tokens
        assert cb.logprobs.token_logprobs == pytest.approx(ca.logprobs.token_logprobs, abs=1e-3)
    assert b.usage.completion_tokens == a.usage.completion_tokens
    # A stop string (applied at the front door, not in the engine).
    ref = old.completions.create(model=MODEL, prompt=LONG_PROMPT, **GREEDY).choices[0].text
    stop = ref[len(ref) // 2:len(ref) // 2 + 3]
    a = old.completions.create(model=MODEL, prompt=LONG_PROMPT, stop=[stop], **GREEDY)
    b = new.completions.create(model=MODEL, prompt=LONG_PROMPT, stop=[stop], **GREEDY)
    assert b.choices[0].text == a.choices[0].text and stop not in b.choices[0].text
    assert b.choices[0].finish_reason == a.choices[0].finish_reason == "stop"
    assert b.usage.completion_tokens == a.usage.completion_tokens < GREEDY["max_tokens"]


def test_an_openai_stream_survives_the_death_of_its_engine_worker(urls, front_door):
    """The worker serving the stream is killed mid-stream: the request
    resumes on a new copy from the tokens already sent, and the client sees
    one response whose text and token count equal an uninterrupted run's."""
    from cluster.control.fleet import NAMESPACE, worker_actor_name

    new = client(urls["new"])
    kw = {"model": MODEL, "prompt": LONG_PROMPT, "temperature": 0, "max_tokens": 450,
          "extra_body": {"ignore_eos": True}}
    reference = new.completions.create(**kw)
    admin = httpx.Client(base_url=urls["admin"], timeout=300,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    status = admin.get("/admin/status").json()
    (device,) = next(m for m in status["models"] if m["name"] == MODEL)["devices"]
    stream = new.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    chunks = [next(stream) for _ in range(2)]
    ray.kill(ray.get_actor(worker_actor_name(device), namespace=NAMESPACE))
    chunks += list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference.choices[0].text
    assert chunks[-1].usage.completion_tokens == 450
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    lost = [a for a in admin.get("/admin/status").json()["recent_actions"]
            if a["action"].startswith("WorkerLost")]
    assert lost and device in lost[-1]["action"]  # it really died mid-stream
