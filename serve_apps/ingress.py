"""The front door: one Ray Serve deployment, every catalog model behind it.

It stays thin. For an OpenAI request it reads only ``model`` from the body,
waits for an active copy through the ``Router`` (a cold model waits in the
controller's bounded queue), and hands the body to vLLM's own OpenAI serving
layer for that model (``cluster/gateway/``), which runs here over Shoal's
resumable token streams: a request is preempted, moved or resumed after a
worker dies without the client noticing. Errors use vLLM's OpenAI error
shape; ``Retry-After`` accompanies every 503 and 429.

Who may send what (tenants, keys, limits) is decided in ``tenants.py`` and
applied by ``admission.py``, shared with gRPC; this module only reads the
header and the body's ``model``, and settles each request in a ``finally``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import weakref
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.catalog import Catalog
from cluster.control.controller import get_or_create_controller
from cluster.errors import (BadRequestError, RetryLaterError, ShoalError, UnauthorizedError,
                            UnknownModelError, root_cause)
from cluster.openai_protocol import CHAT, COMPLETIONS, error_body, sse_error
from cluster.control.router import Router
from cluster.coalesce import sse_batches
from cluster.gateway.frontends import OpenAIFrontends
from cluster.gateway.usage import count_into
from serve_apps.admission import Admission, Admitted, request_id_from
from serve_apps.grpc_service import ShoalGrpcMixin
from serve_apps.metrics import FrontDoorMetrics
from serve_apps.rate_limit import RateLimiter
from serve_apps.tenants import AdminKey, TenantGate

log = logging.getLogger(__name__)

app = FastAPI(title="Shoal", description="Every catalog model behind one OpenAI endpoint")


def error_response(e: Exception) -> JSONResponse:
    """A ShoalError as an OpenAI-shaped JSON error. Any other exception is
    logged and answered without its message: Ray's wrappers carry actor
    ids, pids, node addresses and remote tracebacks, none of them a
    client's business."""
    e = root_cause(e)
    if not isinstance(e, ShoalError):
        log.error("request failed: %r", e)
        e = ShoalError("internal error; the server logged it")
    headers = {}
    if isinstance(e, RetryLaterError):
        headers["Retry-After"] = str(max(1, round(e.retry_after_s)))
    if isinstance(e, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(str(e), e.status, e.code), status_code=e.status,
                        headers=headers)


async def _admin_device(request: Request, required: bool) -> str | None:
    """The optional ``{"device": id}`` body of an admin action; a body that
    is not that is a 400 (not an action somewhere else)."""
    raw = await request.body()
    if not raw.strip():
        body = {}
    else:
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequestError("the body is not valid JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("device", ""), (str, type(None))):
        raise BadRequestError('body must be {"device": "<device id>"}')
    device = body.get("device")
    if required and device is None:
        raise BadRequestError('body must be {"device": "<device id>"}')
    return device


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (no such route, wrong method) in the OpenAI shape."""
    return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body("invalid request parameters", 400), status_code=400)


# Module-level helpers the deployment uses must be defined above it: Serve
# serializes the class when the decorator runs, capturing only the globals
# that exist at that point.
SSE_DONE = "data: [DONE]"  # the OpenAI stream's last event


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class ShoalIngress(ShoalGrpcMixin):
    def __init__(self, catalog: dict, admin_key: str | None = None,
                 rate_limit_rps: float | None = None,
                 rate_limits: dict[str, float] | None = None):
        self.catalog = Catalog.model_validate(catalog)
        self.specs = {m.name: m for m in self.catalog.models}
        # Tenant keys stay here, where they are checked: not in the controller.
        self.controller = get_or_create_controller(self.catalog.without_tenants())
        self.metrics = FrontDoorMetrics()
        self.router = Router(self.controller, on_resume=self.metrics.request_resumed)
        self.frontends = OpenAIFrontends(self.specs, self.router)
        self.limiter = RateLimiter(rate_limit_rps, rate_limits)
        self.tenants = TenantGate(self.catalog.tenants)  # reads key_env variables here
        self.admin_key = AdminKey(admin_key or os.environ.get("SHOAL_ADMIN_KEY") or None,
                                  self.tenants.enabled)
        self.admission = Admission(self.specs, self.tenants, self.limiter, self.metrics)

    # ------------------------------------------------------------ OpenAI
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._openai(CHAT, request)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._openai(COMPLETIONS, request)

    @app.get("/v1/models")
    async def models(self, request: Request):
        """The models that exist for the caller's tenant (all when no tenants)."""
        from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

        try:
            visible = set(self.admission.visible(
                self.admission.authenticate(request.headers.get("authorization"))))
        except UnauthorizedError as e:
            return error_response(e)
        try:
            status = await self.controller.status.remote()
        except Exception as e:  # noqa: BLE001 - Ray's message names actors and nodes
            return error_response(e)
        by_name = {m["name"]: m for m in status["models"]}
        cards = [ModelCard(id=m.name, owned_by="shoal", root=m.path,
                           max_model_len=m.max_model_len, family=m.family,
                           state=by_name.get(m.name, {}).get("state", "cold"),
                           devices=by_name.get(m.name, {}).get("devices", {}))
                 for m in self.catalog.models if m.name in visible]
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

    async def _openai(self, kind: str, request: Request):
        t0 = time.monotonic()
        try:
            tenant = self.admission.authenticate(request.headers.get("authorization"))
        except UnauthorizedError as e:
            return error_response(e)
        try:
            body = await request.json()
        except Exception:
            return error_response(BadRequestError("request body is not valid JSON"))
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):
            return error_response(BadRequestError("'model' is required and must be a string"))
        rid = request_id_from(request.headers.get("x-request-id"), body.get("request_id"))
        try:
            admitted = self.admission.admit(tenant, model, rid, kind)
        except ShoalError as e:  # 404 (unknown, or not this tenant's), 429
            return error_response(e)
        # vLLM builds its engine request ids from this one (cmpl-<rid>-...).
        body = {**body, "request_id": rid}
        # The engine client counts this request's tokens into it (usage.py).
        count_into(admitted.usage)
        headers = {"X-Request-Id": rid}
        try:
            items, first = await self._start(model, kind, body)
        except asyncio.CancelledError:  # the client left while the model loaded
            self.admission.finish(admitted, 499)
            raise
        except Exception as e:  # noqa: BLE001 - a ShoalError keeps its status; the rest is hidden
            self.metrics.request_failed(model, root_cause(e))
            self.admission.finish(admitted, getattr(root_cause(e), "status", 500))
            return error_response(e)
        if not first.get("stream"):
            self.metrics.request_done(model, first["status"], t0, [time.monotonic()])
            self.admission.finish(admitted, first["status"])
            return Response(json.dumps(first["body"]), status_code=first["status"],
                            media_type="application/json", headers=headers)
        relay = self._relay(items, admitted, t0)
        # A stream Serve never starts (the client left first) never runs
        # _relay's finally: settle it when the generator is dropped.
        weakref.finalize(relay, self.admission.finish, admitted, 499)
        return StreamingResponse(relay, media_type="text/event-stream", headers=headers)

    async def _start(self, model: str, kind: str, body: dict) -> tuple[Any, dict]:
        """A cold model waits (or gets its 503) before vLLM sees the
        request; then the serving layer's first item: the whole response,
        an error, or the start of a stream."""
        await self.router.pick(model, arrival=False)
        layer = await self.frontends.get(model)
        items = layer.handle(kind, body)
        first = await items.__anext__()
        if not first.get("stream"):
            await items.aclose()
        return items, first

    async def _relay(self, items, admitted: Admitted, t0: float):
        """Pass vLLM's SSE strings on, those that come together as one
        message to Serve's proxy (``sse_batches``). A client that leaves
        closes the stream, which aborts its engine requests wherever they
        run."""
        model = admitted.model
        stamps: list[float] = []
        finished = False
        events = sse_batches(items)
        try:
            async for sse in events:
                stamps.append(time.monotonic())
                # Done once the last event is out: a client may hang up right
                # after it, before the Ray stream reports its own end, and
                # that is no disconnect (it was counted a 499 before).
                # (A message may carry several events: [DONE] is its last.)
                finished = finished or sse.rstrip().endswith(SSE_DONE)
                yield sse
            finished = True
        except Exception:  # vLLM turns request failures into error events; not this
            log.exception("OpenAI stream for %s broke", model)
            yield sse_error("the stream was interrupted; retry the request", 503)
        finally:
            await events.aclose()  # stops ``items`` too, if still running
            await items.aclose()
            self.metrics.request_done(model, 200 if finished else 499, t0, stamps,
                                      self.specs[model].slo)
            self.admission.finish(admitted, 200 if finished else 499)

    # ------------------------------------------------------- health, metrics
    @app.get("/health")
    async def health(self):
        try:
            await asyncio.wait_for(self.controller.ping.remote(), 5)
        except Exception as e:  # the message names actors and nodes: logged, not shown
            log.warning("health check failed: %r", e)
            return JSONResponse({"status": "unhealthy", "error": "the controller did not answer"},
                                status_code=503, headers={"Retry-After": "5"})
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text(self):
        try:
            snapshot = await self.controller.metrics.remote()
        except Exception as e:  # noqa: BLE001 - Ray's message names actors and nodes
            return error_response(e)
        return PlainTextResponse(self.metrics.render(snapshot),
                                 media_type="text/plain; version=0.0.4")

    # ----------------------------------------------------------------- admin
    @app.get("/admin/status")
    async def admin_status(self, request: Request):
        return await self._admin(request, self.controller.status)

    @app.post("/admin/models/{name}/load")
    async def admin_load(self, name: str, request: Request):
        return await self._admin(request, self.controller.load, name, model=name, device=False)

    @app.post("/admin/models/{name}/unload")
    async def admin_unload(self, name: str, request: Request):
        return await self._admin(request, self.controller.unload, name, model=name)

    @app.post("/admin/models/{name}/migrate")
    async def admin_migrate(self, name: str, request: Request):
        return await self._admin(request, self.controller.migrate, name, model=name, device=True)

    async def _admin(self, request: Request, method, *args, model: str | None = None,
                     device: bool | None = None):
        """Check the admin key (``tenants.AdminKey``), the model, the
        ``{"device": id}`` body (``device``: None = no body, False =
        optional, True = required), then call the controller."""
        if not self.admin_key.allows(request.headers.get("authorization")):
            return JSONResponse(error_body("admin routes need 'Authorization: Bearer <admin "
                                           "key>' (admin_key or SHOAL_ADMIN_KEY)",
                                           401, "unauthorized"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        if model is not None and model not in self.specs:
            return error_response(UnknownModelError(f"model {model!r} is not in the catalog"))
        try:
            if device is not None:
                args = (*args, await _admin_device(request, required=device))
            return JSONResponse(await method.remote(*args))
        except Exception as e:  # ShoalErrors keep their status; anything else is a 500
            return error_response(e)
