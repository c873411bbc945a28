"""Per-request outcomes of one run, and what they add up to.

A request meets its SLO if its TTFT (first token minus arrival) and its
TPOT (mean gap between tokens after the first) are both within its model's
targets. A request still unfinished when the run stops misses. Only
requests arriving after the warm-up are scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cluster.sim.workload import Arrival


@dataclass(frozen=True)
class RequestOutcome:
    """One request's fate (the fidelity run compares these with live ones)."""

    index: int  # its position in the trace
    model: str
    arrived_s: float
    ttft_s: float | None  # None: no token came
    tpot_s: float | None  # None: fewer than two tokens came
    finished: bool
    met_slo: bool
    device: str | None


class Results:
    def __init__(self, trace: Sequence[Arrival], slo: Mapping[str, tuple[float, float]],
                 score_from_s: float):
        self.trace = trace
        self.slo = slo
        self.score_from_s = score_from_s
        n = len(trace)
        self.first_at = np.full(n, np.nan)
        self.finish_at = np.full(n, np.nan)
        self.tokens = np.zeros(n, dtype=np.int64)
        self.device: list[str | None] = [None] * n
        self.finished = 0
        self.ended_at = 0.0

    def finish(self, req, now: float, device: str) -> None:
        i = req.index
        self.first_at[i] = req.first_at if req.first_at is not None else np.nan
        self.finish_at[i] = now
        self.tokens[i] = req.generated
        self.device[i] = device
        self.finished += 1

    def close(self, now: float) -> None:
        self.ended_at = now

    # ------------------------------------------------------------ views
    def _arrays(self):
        t = np.array([a.time_s for a in self.trace])
        ttft_slo = np.array([self.slo.get(a.model, (0.0, 0.0))[0] for a in self.trace])
        tpot_slo = np.array([self.slo.get(a.model, (0.0, 0.0))[1] for a in self.trace])
        ttft = self.first_at - t
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(self.tokens > 1, (self.finish_at - self.first_at) /
                            np.maximum(self.tokens - 1, 1), 0.0)
        done = ~np.isnan(self.finish_at)
        ok = done & (ttft <= ttft_slo + 1e-9) & (tpot <= tpot_slo + 1e-9)
        return t, ttft, tpot, done, ok

    def outcomes(self) -> list[RequestOutcome]:
        t, ttft, tpot, done, ok = self._arrays()
        return [RequestOutcome(i, a.model, a.time_s,
                               None if np.isnan(ttft[i]) else float(ttft[i]),
                               float(tpot[i]) if done[i] and self.tokens[i] > 1 else None,
                               bool(done[i]), bool(ok[i]), self.device[i])
                for i, a in enumerate(self.trace)]

    def summary(self) -> dict:
        t, ttft, tpot, done, ok = self._arrays()
        scored = t >= self.score_from_s
        n = int(scored.sum())
        window = (max(t[scored]) - self.score_from_s) if n else 0.0
        met = ok & scored
        tt, tp = ttft[scored & done], tpot[scored & done]

        def pct(x, p):
            return round(float(np.percentile(x, p)), 4) if len(x) else None

        out_tokens = np.array([a.output_tokens for a in self.trace])
        return {
            "requests": n,
            "finished": int((done & scored).sum()),
            "slo_attainment": round(float(met.sum()) / n, 5) if n else None,
            "ttft_s_p50": pct(tt, 50), "ttft_s_p99": pct(tt, 99),
            "tpot_s_p50": pct(tp, 50), "tpot_s_p99": pct(tp, 99),
            # Goodput: what met its SLO, per second of the scored window.
            "goodput_rps": round(float(met.sum()) / window, 4) if window > 0 else None,
            "goodput_tokens_per_s": round(float(out_tokens[met].sum()) / window, 2)
            if window > 0 else None,
        }
