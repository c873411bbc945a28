"""The gRPC front door: ``shoal.Shoal`` (``serve_apps/shoal.proto``).

Ray Serve's gRPC proxy (``serve.start(grpc_options={"grpc_servicer_functions":
[GRPC_SERVICER], ...})``) sends each call to the ingress deployment's method
named like the RPC, with the request protobuf; a server-streaming RPC is an
async generator of response protobufs. ``ShoalIngress`` inherits the methods
from ``ShoalGrpcMixin``, so HTTP and gRPC share one deployment, its
``Router``, controller handle, rate limiter and metrics. Clients pick the app
with the metadata key ``("application", "shoal")``.

Errors become gRPC status codes: the code is set on Serve's gRPC context and
the error re-raised, which Serve passes to the client as that status.

Tenants as on HTTP (``admission.py``): the key comes in the metadata
``authorization`` (``Bearer <key>``); no key or a wrong one is
UNAUTHENTICATED, a model the tenant may not use is NOT_FOUND like an
unknown one, and ``ListModels`` lists only the tenant's models.

A cancelled ``Generate`` (Serve cancels it when the client cancels) closes
the router's stream, which aborts the request inside vLLM. Known gap, in Ray
Serve 2.60's gRPC proxy: a client's cancel that lands while the proxy is
writing a message (not waiting on the replica) never reaches the replica,
so that request runs on to ``max_tokens``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import grpc

from cluster.errors import BadRequestError, ShoalError, root_cause
from cluster.control.fleet import is_actor_death
from serve_apps import shoal_pb2
from serve_apps.admission import request_id_from

# For ``serve.start(grpc_options=...)`` and ``grpc_servicer_functions`` in serve.yaml.
GRPC_SERVICER = "serve_apps.shoal_pb2_grpc.add_ShoalServicer_to_server"

# ShoalError.status (HTTP-ish) -> gRPC status code.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.UNAVAILABLE,  # the copy moved away: retrying is right
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def grpc_code(e: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an error (Ray's wrappers looked through)."""
    e = root_cause(e)
    if isinstance(e, ShoalError):
        return STATUS_CODES.get(e.status, grpc.StatusCode.INTERNAL)
    if is_actor_death(e):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def _fail(grpc_context, e: BaseException) -> BaseException:
    """Set ``e``'s status on the call and return the error to raise."""
    cause = root_cause(e)
    if grpc_context is not None:
        grpc_context.set_code(grpc_code(cause))
        grpc_context.set_details(str(cause) or type(cause).__name__)
    return cause if isinstance(cause, ShoalError) else e


def sampling_from(request: shoal_pb2.GenerateRequest) -> dict[str, Any]:
    """The sampling dict for the router: only the fields the client set, so
    an explicit 0 (greedy temperature, say) differs from "engine default"."""
    sampling: dict[str, Any] = {}
    for name in ("max_tokens", "seed"):
        if request.HasField(name):
            sampling[name] = int(getattr(request, name))
    for name in ("temperature", "top_p"):
        if request.HasField(name):  # float32 on the wire: 0.7 -> 0.699999988
            sampling[name] = round(float(getattr(request, name)), 6)
    if request.stop:
        sampling["stop"] = list(request.stop)
    return sampling


class ShoalGrpcMixin:
    """``shoal.Shoal`` on the ingress deployment. The host class provides
    ``router`` (``cluster.control.router.Router``), ``controller`` (the placement
    controller's handle), ``specs`` (catalog name -> spec), ``admission``
    (``serve_apps.admission.Admission``) and ``metrics``."""

    async def ListModels(self, request: shoal_pb2.ListModelsRequest, grpc_context=None):
        try:
            visible = self.admission.visible(self.admission.authenticate(
                _authorization(grpc_context)))
            status = await self.controller.status.remote()
        except Exception as e:
            raise _fail(grpc_context, e) from None
        by_name = {m["name"]: m for m in status["models"]}
        out = shoal_pb2.ListModelsResponse()
        for name in visible:
            spec, m = self.specs[name], by_name.get(name, {})
            devices = m.get("devices") or {}
            out.models.add(name=name, family=spec.family, state=m.get("state", "cold"),
                           devices=sorted(devices),
                           device_states={d: str(s) for d, s in devices.items()})
        return out

    async def Generate(self, request: shoal_pb2.GenerateRequest, grpc_context=None):
        t0 = time.monotonic()
        model = request.model
        try:
            tenant = self.admission.authenticate(_authorization(grpc_context))
            if not model:
                raise BadRequestError("'model' is required")
            rid = request_id_from(request.request_id)
            admitted = self.admission.admit(tenant, model, rid, "grpc", lists="ListModels")
        except ShoalError as e:  # as on HTTP: refusals (401, 404, 429) are no model's requests
            raise _fail(grpc_context, e) from None
        stamps: list[float] = []
        finished = failed = False
        status = 499  # the client left mid-stream, unless it ends otherwise
        usage = admitted.usage
        try:
            if not request.prompt and not request.prompt_token_ids:
                raise BadRequestError("give 'prompt' or 'prompt_token_ids'")
            stream = self.router.stream(model, request.prompt or None,
                                        list(request.prompt_token_ids) or None,
                                        sampling_from(request), rid)
            # aclosing: when the client leaves, Serve cancels this generator and
            # the router's stream is closed at once; its ``finally`` cancels the
            # worker's stream, which aborts the request inside vLLM.
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    stamps.append(time.monotonic())
                    if "request" in chunk:  # the first chunk: the prompt as tokens
                        usage.prompt_tokens = len(chunk["request"]["prompt_token_ids"])
                    usage.completion_tokens = chunk.get("num_generated") or 0
                    finished = bool(chunk.get("finished"))
                    yield shoal_pb2.GenerateChunk(
                        text=chunk.get("text") or "", token_ids=chunk.get("token_ids") or [],
                        finished=finished, finish_reason=chunk.get("finish_reason") or "",
                        num_generated=chunk.get("num_generated") or 0)
                    if finished:
                        status = 200
                        break
        except Exception as e:
            failed = True
            cause = root_cause(e)
            status = getattr(cause, "status", 500)
            self.metrics.request_failed(model, cause)
            raise _fail(grpc_context, e) from None
        finally:
            if not failed:
                self.metrics.request_done(model, status, t0, stamps, self.specs[model].slo)
            self.admission.finish(admitted, status)


def _authorization(grpc_context) -> str | None:
    """The ``authorization`` metadata value (gRPC keys are lower case)."""
    if grpc_context is None:
        return None
    for key, value in grpc_context.invocation_metadata():
        if key == "authorization":
            return value
    return None
