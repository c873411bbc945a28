"""One structured log line per step of a request, the same request id on each.

The front door (accepted, finished or failed with its status), the router
(the device it picked, a resume after a move or a failure) and the engine
worker (started, moved, finished) each write ``request_event`` lines to the
``shoal.request`` logger as ``key=value`` pairs::

    shoal.request event=routed request_id=cmpl-3f2a...-0-9c1d model=tiny-llama-a device=gpu-1

so ``grep 3f2a...`` over the Ray session's logs follows one request across
processes and moves. The front door's id is the one vLLM's serving layer
builds its own from (``cmpl-<id>``, ``chatcmpl-<id>``, then ``-<n>`` and a
suffix per child), so the router's and the worker's ids contain it.

The logger logs at INFO even in Ray's worker processes, where nobody
configures logging: without a handler of its own (and none on the root
logger), it gets one on stderr, which Ray writes to the worker's log file.
Never pass a key or a prompt here: values are written as they are.
"""

from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger("shoal.request")
log.setLevel(logging.INFO)


def request_event(event: str, request_id: str | None, **fields) -> None:
    """Log ``event`` for ``request_id`` with ``fields`` (None values left out)."""
    if not log.isEnabledFor(logging.INFO):
        return
    _ensure_handler()
    parts = [f"event={event}", f"request_id={request_id}"]
    parts += [f"{k}={_value(v)}" for k, v in fields.items() if v is not None]
    log.info(" ".join(parts))


def _value(v) -> str:
    """Bare when plain; else a JSON string, so a client-given value can
    neither split the line nor forge a field."""
    s = str(v)
    return json.dumps(s) if not s or any(c.isspace() or c in '"=\\' or not c.isprintable()
                                         for c in s) else s


def _ensure_handler() -> None:
    if log.handlers or logging.getLogger().handlers:
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    log.addHandler(h)
