"""The gRPC front door end to end: a real grpcio client and the generated
stub against Ray Serve's gRPC proxy, on the real app on the 3-node test
cluster with real vLLM engines on CPU (``serve_apps/shoal.proto``)."""

from __future__ import annotations

import grpc
import pytest
import ray

from cluster.control.fleet import NAMESPACE, worker_actor_name
from cluster.errors import (BadRequestError, ColdStartQueueFullError, LoadTimeoutError,
                            PromptTooLongError, UnknownModelError)
from cluster.engine.request_stream import RATE_WINDOW_S
from serve_apps import shoal_pb2, shoal_pb2_grpc
from serve_apps.grpc_service import grpc_code, sampling_from
from tests.conftest import TIMESHARED_MODELS
from tests.helpers import LONG_PROMPT, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.ray]

APP = (("application", "shoal"),)
TIMEOUT_S = 300  # the first request loads a cold model
CATALOG = {"tiny-llama-a", "tiny-llama-b", "tiny-llama-c", "tiny-qwen", "needs-amd",
           *TIMESHARED_MODELS}


@pytest.fixture(scope="module")
def stub(front_door):
    channel = grpc.insecure_channel(front_door["grpc"])
    grpc.channel_ready_future(channel).result(timeout=60)
    yield shoal_pb2_grpc.ShoalStub(channel)
    channel.close()


def generate(stub, **fields) -> list[shoal_pb2.GenerateChunk]:
    return list(stub.Generate(shoal_pb2.GenerateRequest(**fields), metadata=APP,
                              timeout=TIMEOUT_S))


def list_models(stub) -> dict[str, shoal_pb2.ModelInfo]:
    out = stub.ListModels(shoal_pb2.ListModelsRequest(), metadata=APP, timeout=60)
    return {m.name: m for m in out.models}


def test_sampling_keeps_an_explicit_zero_and_leaves_out_unset_fields():
    req = shoal_pb2.GenerateRequest(model="m", prompt="p", temperature=0, stop=["\n"])
    assert sampling_from(req) == {"temperature": 0.0, "stop": ["\n"]}
    req = shoal_pb2.GenerateRequest(max_tokens=3, top_p=0.9, seed=0)
    assert sampling_from(req) == {"max_tokens": 3, "top_p": 0.9, "seed": 0}


def test_errors_map_to_grpc_codes_through_ray_wrappers():
    from ray.exceptions import RayTaskError

    def wrapped(e):  # raised in a worker, re-raised through another actor
        return RayTaskError("stream", "tb", RayTaskError("generate", "tb", e)
                            .as_instanceof_cause())
    assert grpc_code(wrapped(ColdStartQueueFullError("full"))) == grpc.StatusCode.UNAVAILABLE
    assert grpc_code(LoadTimeoutError("slow")) == grpc.StatusCode.UNAVAILABLE
    assert grpc_code(wrapped(PromptTooLongError("long"))) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(BadRequestError("bad")) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(UnknownModelError("who")) == grpc.StatusCode.NOT_FOUND
    assert grpc_code(RuntimeError("bug")) == grpc.StatusCode.INTERNAL


def test_list_models_lists_every_catalog_model(stub):
    models = list_models(stub)
    assert set(models) == CATALOG
    assert all(m.state in {"cold", "loading", "active", "parked"} for m in models.values())
    assert models["tiny-qwen"].family == "tiny-qwen"
    assert models["tiny-llama-b"].family == "tiny-llama"
    assert models["needs-amd"].state == "cold" and not models["needs-amd"].devices


def test_generate_streams_greedy_tokens_deterministically(stub):
    req = dict(model="tiny-llama-a", prompt=LONG_PROMPT, temperature=0, max_tokens=12)
    first = generate(stub, **req)
    second = generate(stub, **req)
    ids = [t for c in first for t in c.token_ids]
    assert len(ids) == 12
    assert ids == [t for c in second for t in c.token_ids]
    assert "".join(c.text for c in first) == "".join(c.text for c in second) != ""
    assert first[-1].finished and first[-1].finish_reason == "length"
    assert first[-1].num_generated == 12
    assert not any(c.finished for c in first[:-1])
    a = list_models(stub)["tiny-llama-a"]
    assert a.state == "active" and a.devices and set(a.device_states) == set(a.devices)


def test_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, model="no-such-model", prompt="hi", max_tokens=2)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in e.value.details() and "catalog" in e.value.details()


def test_bad_requests_are_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as e:  # vLLM's own sampling validation
        generate(stub, model="tiny-llama-a", prompt="hi", temperature=-1, max_tokens=2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, model="tiny-llama-a", prompt_token_ids=[5] * 600, max_tokens=2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context of 512" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, model="tiny-llama-a", max_tokens=2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_cancelled_generate_aborts_the_engine_request(front_door):
    """When Serve cancels ``Generate`` (what its gRPC proxy does when the
    client cancels), generation stops inside vLLM: the engines go idle long
    before 400 tokens could have been made. (Two things stop it: the
    router's ``finally`` cancels the worker's stream, and Ray's recursive
    cancel reaches that actor task too.)

    The call goes through a Serve handle, not a grpcio client: Ray Serve
    2.60's gRPC proxy loses a client's cancel whenever it lands while the
    proxy is writing a message rather than waiting on the replica (grpc aio
    then drops the proxy's response generator without closing it, so the
    replica is never told); a bare Serve deployment streaming every 5 ms
    shows it for about half of the cancelled calls. The request then runs to
    ``max_tokens``, as if the client had stayed.
    """
    from ray import serve

    max_tokens = 400
    handle = serve.get_app_handle("shoal").options(stream=True, method_name="Generate")
    stream = handle.remote(shoal_pb2.GenerateRequest(
        model="tiny-llama-a", prompt=LONG_PROMPT, temperature=0, max_tokens=max_tokens))
    got = []
    for chunk in stream:
        got.append(chunk)
        if len(got) == 2:
            break
    assert not got[-1].finished
    stream.cancel()
    status = ray.get(front_door["controller"].status.remote())
    workers = [ray.get_actor(worker_actor_name(d["id"]), namespace=NAMESPACE)
               for d in status["devices"]]

    def idle():
        stats = ray.get([w.stats.remote() for w in workers])
        return all(("tiny-llama-a" not in s.models or s.models["tiny-llama-a"].running == 0)
                   and all(sh.engine_unfinished == 0 for sh in s.shells.values())
                   for s in stats) and stats
    stats = wait_until(idle, timeout_s=30)
    made = sum(s.tokens_per_s for s in stats) * RATE_WINDOW_S  # tokens in the last 10 s
    assert made < max_tokens
