"""What a client sees when something goes wrong at the front door, without
a cluster: Ray's wrappers never reach it (they name actors, pids, nodes and
carry remote tracebacks), a body vLLM's validators refuse is a 400 whatever
they raise, and vLLM's serving layer runs with request-supplied templates,
local media, prompt embeddings and remote code turned off."""

from __future__ import annotations

import json
import re
from http import HTTPStatus

import pytest
from ray.exceptions import RayTaskError

from cluster.errors import ColdStartQueueFullError, UnknownModelError
from cluster.gateway.openai_serving import (SAFE_SERVING, body_error_item, client_exception,
                                            serving_args)

INTERNALS = re.compile(r"Traceback|pid=|ip=|actor_id|ray::|10\.1\.2\.3")


def ray_wrapped(cause: Exception) -> Exception:
    """``cause`` as a caller of a Ray actor receives it."""
    try:
        raise cause
    except Exception as e:
        import traceback
        err = RayTaskError("EngineWorker.generate", traceback.format_exc(), e,
                           proctitle="ray::EngineWorker.generate", pid=4242, ip="10.1.2.3",
                           actor_id="a" * 32)
    return err.as_instanceof_cause()


def test_a_ray_wrapped_engine_error_reaches_vllm_as_the_original_error():
    wrapped = ray_wrapped(ValueError("token id 9999 is out of vocabulary"))
    assert INTERNALS.search(str(wrapped))  # what the client used to get
    e = client_exception(wrapped)
    assert type(e) is ValueError and str(e) == "token id 9999 is out of vocabulary"


def test_a_shoal_error_keeps_its_status_through_vllm():
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    for err, status in [(ray_wrapped(ColdStartQueueFullError("queue full", 3)), 503),
                        (UnknownModelError("no such model"), 404)]:
        resp = create_error_response(client_exception(err))
        assert resp.error.code == status and not INTERNALS.search(resp.error.message)


def test_anything_else_is_a_retryable_503_that_names_nothing():
    from vllm.exceptions import RetryableRequestError

    e = client_exception(ray_wrapped(RuntimeError("CUDA error at 10.1.2.3 pid=4242")))
    assert isinstance(e, RetryableRequestError) and e.status_code == HTTPStatus.SERVICE_UNAVAILABLE
    assert not INTERNALS.search(str(e))


def test_whatever_a_body_validator_raises_is_a_400():
    from vllm.exceptions import VLLMValidationError

    item = body_error_item(VLLMValidationError("json_schema must be given",
                                               parameter="response_format"))
    assert item["status"] == 400 and "json_schema" in item["body"]["error"]["message"]
    item = body_error_item(KeyError("x"))  # vLLM would call this a 500
    assert item["status"] == 400 and item["body"]["error"]["code"] == 400


def test_vllm_serving_runs_with_request_templates_media_embeds_and_remote_code_off():
    args = serving_args("/models/m", "m")
    assert {k: getattr(args, k) for k in SAFE_SERVING} == {
        "trust_request_chat_template": False, "allowed_local_media_path": "",
        "enable_prompt_embeds": False, "logits_processor_pattern": None,
        "trust_remote_code": False}


def test_the_front_door_hides_what_is_not_a_shoal_error():
    from serve_apps.ingress import error_response

    resp = error_response(ray_wrapped(KeyError("device-7")))
    body = json.loads(resp.body)
    assert resp.status_code == 500 and body["error"]["code"] == 500
    assert not INTERNALS.search(resp.body.decode()) and "device-7" not in resp.body.decode()
    resp = error_response(ray_wrapped(ColdStartQueueFullError("too many wait", 7)))
    assert resp.status_code == 503 and resp.headers["retry-after"] == "7"
    assert json.loads(resp.body)["error"]["message"] == "too many wait"


@pytest.mark.parametrize("raw, status", [(b"", None), (b"  ", None), (b'{"device": "d"}', "d"),
                                         (b"{", 400), (b"[1]", 400), (b'{"device": [1]}', 400),
                                         (b'{"device": 5}', 400), (b"\xff", 400)])
def test_admin_device_bodies(raw, status):
    import asyncio

    from cluster.errors import BadRequestError
    from serve_apps.ingress import _admin_device

    class Req:
        async def body(self):
            return raw
    if status == 400:
        with pytest.raises(BadRequestError):
            asyncio.run(_admin_device(Req(), required=False))
    else:
        assert asyncio.run(_admin_device(Req(), required=False)) == status
        if status is None:
            with pytest.raises(BadRequestError):
                asyncio.run(_admin_device(Req(), required=True))
