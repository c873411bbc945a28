"""Admitting a request at the front door and settling it when it ends.

One path for HTTP and gRPC (``ingress.py``, ``grpc_service.py`` translate):

1. ``authenticate``: the tenant of the Authorization value (401 otherwise);
2. ``admit``: the model must exist *for that tenant* (a restricted tenant's
   other models are 404 exactly like unknown ones), the model's rate limit
   and the tenant's limits must allow it (429); then the request is logged
   ``accepted`` and gets an ``Admitted`` with a fresh ``Usage``;
3. ``finish`` (once, from a ``finally``; later calls do nothing): frees the
   tenant's concurrency slot, adds the request's tokens to its window and
   its counters, and logs ``finished`` or ``failed`` with the status.

Every log line carries the request id (``cluster/request_log.py``) and the
tenant's name; nothing here ever sees a key other than to hand it to the
gate.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

from cluster.catalog import ModelSpec
from cluster.errors import RateLimitedError, UnknownModelError
from cluster.gateway.usage import Usage
from cluster.request_log import request_event
from serve_apps.metrics import FrontDoorMetrics
from serve_apps.rate_limit import RateLimiter
from serve_apps.tenants import Tenant, TenantGate, Ticket

# A client's own request id is used only if it is this plain: it goes into
# log lines and vLLM's ids.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class Admitted:
    """A request the front door took on: what its end must settle."""

    request_id: str  # in every log line of the request, ingress to worker
    model: str
    tenant: Tenant | None  # None: no tenants configured
    ticket: Ticket | None  # the tenant's concurrency slot
    usage: Usage = field(default_factory=Usage)  # filled as tokens pass
    done: bool = False  # finish ran

    @property
    def tenant_name(self) -> str | None:
        return self.tenant.name if self.tenant is not None else None


def request_id_from(*candidates: object) -> str:
    """The first plain client-given id, else a fresh one."""
    for c in candidates:
        if isinstance(c, str) and REQUEST_ID.match(c):
            return c
    return uuid.uuid4().hex


class Admission:
    def __init__(self, specs: dict[str, ModelSpec], gate: TenantGate, limiter: RateLimiter,
                 metrics: FrontDoorMetrics):
        self.specs = specs
        self.gate = gate
        self.limiter = limiter
        self.metrics = metrics

    def authenticate(self, authorization: str | None) -> Tenant | None:
        return self.gate.authenticate(authorization)  # raises UnauthorizedError

    def visible(self, tenant: Tenant | None) -> list[str]:
        """The catalog models that exist for ``tenant``, in catalog order."""
        return [m for m in self.specs if self.gate.sees(tenant, m)]

    def admit(self, tenant: Tenant | None, model: str, request_id: str, kind: str,
              lists: str = "GET /v1/models") -> Admitted:
        """Raises ``UnknownModelError`` (404) or ``RateLimitedError`` (429)."""
        if model not in self.specs or not self.gate.sees(tenant, model):
            self._refused(tenant, request_id, model, 404)
            raise UnknownModelError(f"model {model!r} is not in the catalog; {lists} lists them")
        try:
            limited = self.limiter.check(model)
            if limited is not None:
                raise limited
            ticket = self.gate.admit(tenant)
        except RateLimitedError:
            self._refused(tenant, request_id, model, 429)
            raise
        request_event("accepted", request_id, model=model, kind=kind,
                      tenant=tenant.name if tenant else None)
        return Admitted(request_id, model, tenant, ticket)

    def finish(self, a: Admitted, status: int) -> None:
        """Settle ``a`` once: slot, tokens, counters, the last log line."""
        if a.done:
            return
        a.done = True
        u = a.usage
        self.gate.release(a.ticket, u.total)
        if a.tenant is not None:
            self.metrics.tenant_done(a.tenant.name, status, u.prompt_tokens, u.completion_tokens)
        request_event("finished" if status < 400 else "failed", a.request_id, model=a.model,
                      status=status, tenant=a.tenant_name, tokens_in=u.prompt_tokens,
                      tokens_out=u.completion_tokens)

    def _refused(self, tenant: Tenant | None, request_id: str, model: str, status: int) -> None:
        if tenant is not None:
            self.metrics.tenant_done(tenant.name, status, 0, 0)
        request_event("refused", request_id, model=model, status=status,
                      tenant=tenant.name if tenant else None)
