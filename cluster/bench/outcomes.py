"""How a benchmark request ended, and the arithmetic over many of them
(``shoal bench load`` and ``shoal bench chaos``). Pure: no Ray, no clock,
no I/O, so every rule here is tested without a cluster.

A request ends in exactly one ``Ending``:

- ``OK``: a complete response. Non-streaming: a 200 body whose choice has
  a ``finish_reason`` and all the tokens asked for. Streaming: a 200
  stream that ended with ``data: [DONE]`` after the full token count.
- ``REFUSED``: an HTTP error status before any response began (429, 503,
  404 ...), counted by status; ``Retry-After`` is noted.
- ``ERROR_EVENT``: a stream that began and then carried an OpenAI error
  event (``data: {"error": ...}``): a clear error, not a loss.
- ``LOST``: everything else. The request was sent and got neither a
  complete response nor a clear error: the client's timeout ran out, the
  connection dropped, a 200 body came back short, or a stream ended without
  ``[DONE]`` and without an error event. The goal is none at every rate.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
import math
from dataclasses import dataclass


class Ending(enum.Enum):
    OK = "ok"
    REFUSED = "refused"
    ERROR_EVENT = "error_event"
    LOST = "lost"


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it."""

    ending: Ending
    e2e_s: float  # sent to the last byte (or to the refusal, the error, the timeout)
    streaming: bool
    status: int | None = None  # the HTTP status of a refusal; None otherwise
    retry_after: bool = False  # a refusal carried Retry-After
    ttft_s: float | None = None  # streaming: sent to the first text
    tpot_s: float | None = None  # streaming: mean gap between tokens after the first
    tokens: int = 0  # completion tokens received (usage)
    why: str = ""  # LOST: timeout | dropped | short | no_done; else empty
    text: str = ""  # the completion's text (chaos compares it with the reference)


def classify_stream(done: bool, error_event: bool, tokens: int, want_tokens: int) -> tuple[
        Ending, str]:
    """A stream that began (status 200). ``[DONE]`` with the full count is
    OK; an error event is a clear error whatever came before; the rest is
    lost (``no_done`` when it simply stopped, ``short`` when [DONE] came
    after too few tokens)."""
    if error_event:
        return Ending.ERROR_EVENT, ""
    if not done:
        return Ending.LOST, "no_done"
    if tokens != want_tokens:
        return Ending.LOST, "short"
    return Ending.OK, ""


def classify_body(finish_reason: str | None, tokens: int, want_tokens: int) -> tuple[Ending, str]:
    """A 200 non-streaming body: complete only with a finish reason and the
    tokens asked for (the benches send ``ignore_eos``)."""
    if finish_reason is None or tokens != want_tokens:
        return Ending.LOST, "short"
    return Ending.OK, ""


def percentile(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no samples (undefined, never 0)."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


@dataclass(frozen=True)
class SLO:
    """What a successful request must also meet to count as within SLO."""

    ttft_s: float
    tpot_s: float

    def met(self, o: Outcome) -> bool:
        if o.ending is not Ending.OK:
            return False
        if o.streaming:
            return (o.ttft_s or 0.0) <= self.ttft_s and (o.tpot_s or 0.0) <= self.tpot_s
        # Non-streaming: the whole answer within what the two targets allow.
        return o.e2e_s <= self.ttft_s + self.tpot_s * max(0, o.tokens - 1)


def summarize(outcomes: list[Outcome], slo: SLO) -> dict:
    """One rate's figures: successes, refusals by status, error events,
    lost (and why), TTFT/TPOT/end-to-end p50/p99 of the successes, how
    fast refusals came and whether each had Retry-After."""
    ok = [o for o in outcomes if o.ending is Ending.OK]
    refused = [o for o in outcomes if o.ending is Ending.REFUSED]
    lost = [o for o in outcomes if o.ending is Ending.LOST]
    by_status: dict[str, int] = {}
    for o in refused:
        by_status[str(o.status)] = by_status.get(str(o.status), 0) + 1
    lost_why: dict[str, int] = {}
    for o in lost:
        lost_why[o.why] = lost_why.get(o.why, 0) + 1
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    tpot = [o.tpot_s for o in ok if o.tpot_s is not None]
    e2e = [o.e2e_s for o in ok]
    overload = [o for o in refused if o.status in (429, 503)]
    n = len(outcomes)
    return {
        "requests": n, "successes": len(ok),
        "success_rate": _r(len(ok) / n) if n else None,
        "within_slo": sum(slo.met(o) for o in outcomes),
        "slo_attainment": _r(sum(slo.met(o) for o in outcomes) / n) if n else None,
        "errors_by_status": dict(sorted(by_status.items())),
        "error_events": sum(o.ending is Ending.ERROR_EVENT for o in outcomes),
        "lost": len(lost), "lost_by_why": dict(sorted(lost_why.items())),
        "ttft_s_p50": _r(percentile(ttft, 50)), "ttft_s_p99": _r(percentile(ttft, 99)),
        "tpot_s_p50": _r(percentile(tpot, 50)), "tpot_s_p99": _r(percentile(tpot, 99)),
        "e2e_s_p50": _r(percentile(e2e, 50)), "e2e_s_p99": _r(percentile(e2e, 99)),
        "overload_answers": len(overload),
        "overload_s_p50": _r(percentile([o.e2e_s for o in overload], 50)),
        "overload_s_p99": _r(percentile([o.e2e_s for o in overload], 99)),
        "overload_with_retry_after": sum(o.retry_after for o in overload),
    }


def sustains(row: dict, goal: float) -> bool:
    """A rate is sustained when at least ``goal`` of its requests both
    succeeded and met the SLO (so success alone is not enough)."""
    return row["requests"] > 0 and row["slo_attainment"] is not None and \
        row["slo_attainment"] >= goal


def highest_sustained(rows: list[dict], ok: Callable[[dict], bool]) -> float | None:
    """The highest ``rate`` such that its row and every lower rate's are
    ``ok``; None when even the lowest is not (undefined, not 0). Shared by
    ``bench load`` and ``bench timeshare``."""
    best = None
    for row in sorted(rows, key=lambda r: r["rate"]):
        if not ok(row):
            break
        best = row["rate"]
    return best


def sustainable_rate(rows: list[dict], goal: float) -> float | None:
    """The highest rate such that it and every lower measured rate are
    sustained; None when even the lowest is not (undefined, not 0)."""
    return highest_sustained(rows, lambda row: sustains(row, goal))


def next_rate(rows: list[dict], goal: float, factor: float, past: float,
              max_rates: int) -> float | None:
    """The rate to measure next while stepping up by ``factor``, or None to
    stop: stop after ``max_rates`` rates, or once a rate that is not
    sustained has been measured at or beyond ``past`` x the sustainable
    rate (so the sweep runs to about twice saturation and no further)."""
    if not rows or len(rows) >= max_rates:
        return None
    top = max(r["rate"] for r in rows)
    best = sustainable_rate(rows, goal)
    failed = [r["rate"] for r in rows if not sustains(r, goal)]
    if failed and (best is None or top >= past * best):
        return None
    return top * factor


def load_goals(rows: list[dict], overload_bound_s: float) -> dict:
    """The issue's goals over all rates. ``overload_answers_fast``: every
    rate's 429/503 answers have p99 under the bound and all carry
    Retry-After; None when no rate produced any (undefined, never met)."""
    with_overload = [r for r in rows if r["overload_answers"]]
    fast = None
    if with_overload:
        fast = all(r["overload_s_p99"] < overload_bound_s and
                   r["overload_with_retry_after"] == r["overload_answers"]
                   for r in with_overload)
    return {"lost_zero_at_every_rate": all(r["lost"] == 0 for r in rows) if rows else None,
            "overload_answers_fast": fast,
            "overload_bound_s": overload_bound_s}


RECOVERY_GOAL_S = 60.0  # the bound on recovery, a fresh engine start included


def chaos_entry(outcomes: list[Outcome], reference: str, recovery_s: float | None,
                models_kept: bool, orphans: int) -> dict:
    """One fault's figures: how the requests in flight ended (complete,
    clear error, lost), whether every complete one equals the undisturbed
    greedy ``reference``, and the goals (None where undefined: no
    recovery measured means the recovery goal is not met, never assumed)."""
    ok = [o for o in outcomes if o.ending is Ending.OK]
    clear = [o for o in outcomes if o.ending in (Ending.REFUSED, Ending.ERROR_EVENT)]
    lost = [o for o in outcomes if o.ending is Ending.LOST]
    identical = all(o.text == reference for o in ok) if ok else None
    return {"in_flight": len(outcomes), "completed": len(ok), "clear_errors": len(clear),
            "clear_errors_by_status": sorted(str(o.status or "error_event") for o in clear),
            "lost": len(lost), "lost_by_why": sorted(o.why for o in lost),
            "outputs_identical": identical, "end_s_max": _r(max((o.e2e_s for o in outcomes),
                                                              default=None), 2),
            "recovery_s": _r(recovery_s, 2), "models_kept": models_kept,
            "orphaned_engine_cores": orphans,
            "goal_met": (recovery_s is not None and recovery_s <= RECOVERY_GOAL_S
                         and not lost and identical is not False and models_kept
                         and orphans == 0)}
