"""Tenants at the front door: who sent a request, what it may see, its limits.

The catalog's ``tenants`` section (``cluster/catalog.py``) names API clients,
each with a key (``Authorization: Bearer <key>`` on HTTP, metadata
``authorization`` on gRPC), the models it may use, and limits on requests
and tokens per minute and on requests in flight. This module decides; the
HTTP and gRPC adapters (``ingress.py``, ``grpc_service.py``) only translate.
It lives in ``serve_apps`` because tenants exist only at the front door:
the router, the controller and the engines never see one.

Pure: no Ray, no HTTP, and no clock of its own (``clock`` is injected), so
the tests drive it by hand in microseconds.

Rules it keeps:

- No tenants configured: the gate is off. ``authenticate`` returns None,
  every model is visible, nothing is limited (Shoal as before tenants).
- Keys are held only as SHA-256 digests and a presented key is compared
  with ``hmac.compare_digest`` against every tenant's digest, with no early
  exit: the time taken says nothing about which key, or how much of one,
  matched. No key is ever put in a message, a log line or a label; the
  tenant's NAME is what the rest of the front door sees.
- A request without an Authorization header is the ``anonymous`` tenant's
  when one is configured, else 401. A header with a key that is no tenant's
  is 401 whatever else is configured.
- ``admit`` either refuses (``RateLimitedError`` with ``retry_after_s``) and
  changes nothing, or counts the request and returns a ``Ticket``; releasing
  the ticket (once; later calls do nothing) frees its concurrency slot and
  adds the request's tokens to the tenant's window. Tokens are known only
  when a request ends, so a request that takes the window over budget
  finishes, and the next one is refused until the window has room again.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cluster.catalog import TenantSpec
from cluster.errors import RateLimitedError, UnauthorizedError

WINDOW_S = 60.0  # "per minute": a sliding window of this length
BEARER = "bearer "


@dataclass(frozen=True)
class Tenant:
    """What the front door knows of a tenant once its key matched."""

    name: str  # the metrics label and the log field: never the key
    models: frozenset[str]  # the models it may use; empty = every model
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None

    def sees(self, model: str) -> bool:
        return not self.models or model in self.models


@dataclass
class Ticket:
    """One admitted request; hand it back with ``TenantGate.release``."""

    tenant: str
    released: bool = False  # release is idempotent: a finally may run twice


@dataclass
class _Window:
    """One tenant's recent traffic."""

    admitted: deque = field(default_factory=deque)  # admission times, last WINDOW_S
    tokens: deque = field(default_factory=deque)  # (release time, tokens), last WINDOW_S
    token_sum: int = 0  # sum of ``tokens``
    inflight: int = 0  # admitted, not yet released

    def expire(self, now: float) -> None:
        while self.admitted and self.admitted[0] <= now - WINDOW_S:
            self.admitted.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class TenantGate:
    def __init__(self, tenants: Mapping[str, TenantSpec],
                 environ: Mapping[str, str] = os.environ,
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.tenants = {name: Tenant(name, frozenset(t.models), t.requests_per_minute,
                                     t.tokens_per_minute, t.max_concurrent)
                        for name, t in tenants.items()}
        self._digests: list[tuple[bytes, Tenant]] = []
        self.anonymous: Tenant | None = None
        for name, spec in tenants.items():
            key = spec.resolve_key(name, environ)  # CatalogError naming the field
            if key is None:
                self.anonymous = self.tenants[name]
            else:
                self._digests.append((_digest(key), self.tenants[name]))
        self._windows = {name: _Window() for name in self.tenants}

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    # ------------------------------------------------------------ who is it
    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant an ``Authorization`` header value belongs to (None when
        the gate is off). Raises ``UnauthorizedError``."""
        if not self.enabled:
            return None
        if authorization is None:
            if self.anonymous is not None:
                return self.anonymous
            raise UnauthorizedError("this endpoint needs an API key: "
                                    "'Authorization: Bearer <key>'")
        if authorization[:len(BEARER)].lower() != BEARER:
            raise UnauthorizedError("the Authorization header must be 'Bearer <key>'")
        presented = _digest(authorization[len(BEARER):].strip())
        found: Tenant | None = None
        for digest, tenant in self._digests:  # every one, no early exit
            if hmac.compare_digest(digest, presented):
                found = tenant
        if found is None:
            raise UnauthorizedError("the API key is not valid")
        return found

    @staticmethod
    def sees(tenant: Tenant | None, model: str) -> bool:
        """Whether ``model`` exists for the tenant (every model when off)."""
        return tenant is None or tenant.sees(model)

    # --------------------------------------------------------------- limits
    def admit(self, tenant: Tenant | None) -> Ticket | None:
        """Count a request against the tenant's limits, or refuse it
        (``RateLimitedError``; nothing counted). None when the gate is off."""
        if tenant is None:
            return None
        now = self.clock()
        w = self._windows[tenant.name]
        w.expire(now)
        if tenant.max_concurrent is not None and w.inflight >= tenant.max_concurrent:
            raise RateLimitedError(
                f"tenant {tenant.name!r} already has {w.inflight} requests in flight "
                f"(max_concurrent {tenant.max_concurrent}); retry when one finishes",
                retry_after_s=1)
        rpm = tenant.requests_per_minute
        if rpm is not None and len(w.admitted) >= rpm:
            wait = w.admitted[len(w.admitted) - rpm] + WINDOW_S - now
            raise RateLimitedError(f"tenant {tenant.name!r} may send {rpm} requests per "
                                   f"minute; retry later", retry_after_s=_seconds(wait))
        tpm = tenant.tokens_per_minute
        if tpm is not None and w.token_sum >= tpm:
            raise RateLimitedError(f"tenant {tenant.name!r} used its {tpm} tokens per "
                                   f"minute; retry later",
                                   retry_after_s=_seconds(self._room_at(w, tpm) - now))
        w.admitted.append(now)
        w.inflight += 1
        return Ticket(tenant.name)

    def release(self, ticket: Ticket | None, tokens: int = 0) -> None:
        """The request ended: free its slot and count its tokens (prompt +
        completion). Only the first release of a ticket counts."""
        if ticket is None or ticket.released:
            return
        ticket.released = True
        w = self._windows[ticket.tenant]
        w.inflight -= 1
        if tokens > 0:
            w.tokens.append((self.clock(), tokens))
            w.token_sum += tokens

    def inflight(self, tenant: str) -> int:
        return self._windows[tenant].inflight

    @staticmethod
    def _room_at(w: _Window, tpm: int) -> float:
        """When enough of the window's tokens have expired for it to be
        under ``tpm`` again."""
        over = w.token_sum - tpm
        for at, n in w.tokens:
            over -= n
            if over < 0:
                return at + WINDOW_S
        return w.tokens[-1][0] + WINDOW_S if w.tokens else 0.0


class AdminKey:
    """The admin routes' key (``admin_key`` or ``SHOAL_ADMIN_KEY``), held as
    a digest and compared in constant time. With no admin key the admin
    routes are open, as before tenants, unless tenants are configured: then
    they are closed, so that no client key (or none) ever reaches them."""

    def __init__(self, key: str | None, tenants_configured: bool):
        self._digest = _digest(key) if key else None
        self._closed = tenants_configured

    def allows(self, authorization: str | None) -> bool:
        if self._digest is None:
            return not self._closed
        given = authorization or ""
        key = given[len(BEARER):].strip() if given[:len(BEARER)].lower() == BEARER else ""
        return hmac.compare_digest(_digest(key), self._digest)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _seconds(wait_s: float) -> float:
    """A Retry-After: whole seconds, at least 1."""
    return max(1, math.ceil(wait_s))
