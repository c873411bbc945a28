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

from cluster.errors import (BadRequestError, RateLimitedError, ShoalError, UnknownModelError,
                            root_cause)
from cluster.control.fleet import is_actor_death
from serve_apps import shoal_pb2

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
    controller's handle) and ``specs`` (catalog name -> spec); ``limiter``
    and ``metrics`` are used when present."""

    async def ListModels(self, request: shoal_pb2.ListModelsRequest, grpc_context=None):
        try:
            status = await self.controller.status.remote()
        except Exception as e:
            raise _fail(grpc_context, e) from None
        by_name = {m["name"]: m for m in status["models"]}
        out = shoal_pb2.ListModelsResponse()
        for name, spec in self.specs.items():
            m = by_name.get(name, {})
            devices = m.get("devices") or {}
            out.models.add(name=name, family=spec.family, state=m.get("state", "cold"),
                           devices=sorted(devices),
                           device_states={d: str(s) for d, s in devices.items()})
        return out

    async def Generate(self, request: shoal_pb2.GenerateRequest, grpc_context=None):
        t0 = time.monotonic()
        model = request.model
        try:
            self._check_generate(request)
        except ShoalError as e:
            if not isinstance(e, RateLimitedError):  # as on HTTP: 429s are not counted
                self._metric_failed(model, e)
            raise _fail(grpc_context, e) from None
        stamps: list[float] = []
        finished = failed = False
        stream = self.router.stream(model, request.prompt or None,
                                    list(request.prompt_token_ids) or None,
                                    sampling_from(request), request.request_id or None)
        try:
            # aclosing: when the client leaves, Serve cancels this generator and
            # the router's stream is closed at once; its ``finally`` cancels the
            # worker's stream, which aborts the request inside vLLM.
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    stamps.append(time.monotonic())
                    finished = bool(chunk.get("finished"))
                    yield shoal_pb2.GenerateChunk(
                        text=chunk.get("text") or "", token_ids=chunk.get("token_ids") or [],
                        finished=finished, finish_reason=chunk.get("finish_reason") or "",
                        num_generated=chunk.get("num_generated") or 0)
                    if finished:
                        break
        except Exception as e:
            failed = True
            self._metric_failed(model, root_cause(e))
            raise _fail(grpc_context, e) from None
        finally:
            metrics = getattr(self, "metrics", None)
            if metrics is not None and not failed:  # 499: the client left mid-stream
                metrics.request_done(model, 200 if finished else 499, t0, stamps,
                                     self.specs[model].slo)

    # ------------------------------------------------------------- helpers
    def _check_generate(self, request: shoal_pb2.GenerateRequest) -> None:
        model = request.model
        if not model:
            raise BadRequestError("'model' is required")
        if model not in self.specs:
            raise UnknownModelError(f"model {model!r} is not in the catalog; "
                                    f"ListModels lists them")
        if not request.prompt and not request.prompt_token_ids:
            raise BadRequestError("give 'prompt' or 'prompt_token_ids'")
        limiter = getattr(self, "limiter", None)
        refused = limiter.check(model) if limiter is not None else None
        if refused is not None:
            raise refused

    def _metric_failed(self, model: str, e: BaseException) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None and model in self.specs:
            metrics.request_failed(model, e)
