"""Workloads: who asks for which model when, with how many tokens.

A trace is a time-sorted tuple of ``Arrival``s; every generator takes a
seed, and the same seed gives the same trace. What is here:

- arrivals: Poisson per model (``poisson``), Gamma with a given coefficient
  of variation (``gamma``; AlpaServe's bursty arrivals, CV up to 3+);
- popularity: uniform, or a power law ``rate_i ~ (i+1)^-alpha`` (MuxServe,
  alpha 0.7-2.1) over a total rate (``power_law_rates``);
- Aegaeon's catalog: 60% Qwen2.5-7B, 20% Yi-1.5-9B, 20% Llama-2-13B,
  aliased to n models (``aegaeon_catalog``);
- lengths: ShareGPT-like (``LengthShape``), with Aegaeon's variants that
  double the input or the output;
- CSV trace replay: ``time,model,input_tokens,output_tokens`` (``read_csv``).

ShareGPT-like lengths, the fit: input and output tokens are lognormal with
sigma 1.0 (a long tail), clipped to [4, 4096] and [8, 2048], their medians
(98 and 212) set so the clipped means match the ShareGPT means the vLLM
paper reports (161 input and 338 output tokens; Kwon et al., SOSP'23,
section 6.1). A moment fit, not a fit to the raw dataset, which is not
reachable here; the bench's lognormal outputs (``cluster/bench/timeshare.py``)
have the same shape.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.sim.profiles import ModelProfile, alias

AEGAEON_MIX = (("qwen2.5-7b", 0.6), ("yi-1.5-9b", 0.2), ("llama-2-13b", 0.2))
CSV_COLUMNS = ("time", "model", "input_tokens", "output_tokens")


@dataclass(frozen=True)
class Arrival:
    time_s: float
    model: str
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LengthShape:
    """Lognormal token counts (median, sigma, clip range) for inputs and outputs."""

    input_median: float = 98.0
    input_sigma: float = 1.0
    input_range: tuple[int, int] = (4, 4096)
    output_median: float = 212.0
    output_sigma: float = 1.0
    output_range: tuple[int, int] = (8, 2048)

    def scaled(self, input_x: float = 1.0, output_x: float = 1.0) -> "LengthShape":
        """Aegaeon's variants: 2x input or 2x output (medians and caps scaled)."""
        return LengthShape(self.input_median * input_x, self.input_sigma,
                           (self.input_range[0], int(self.input_range[1] * input_x)),
                           self.output_median * output_x, self.output_sigma,
                           (self.output_range[0], int(self.output_range[1] * output_x)))


SHAREGPT = LengthShape()


def _lengths(rng: np.random.Generator, n: int, median: float, sigma: float,
             bounds: tuple[int, int]) -> np.ndarray:
    return np.clip(np.rint(median * np.exp(sigma * rng.standard_normal(n))),
                   bounds[0], bounds[1]).astype(int)


def _with_lengths(times: np.ndarray, models: Sequence[str], rng: np.random.Generator,
                  shape: LengthShape) -> tuple[Arrival, ...]:
    n = len(times)
    ins = _lengths(rng, n, shape.input_median, shape.input_sigma, shape.input_range)
    outs = _lengths(rng, n, shape.output_median, shape.output_sigma, shape.output_range)
    order = np.argsort(times, kind="stable")
    return tuple(Arrival(float(times[i]), models[i], int(ins[i]), int(outs[i])) for i in order)


def poisson(rates: Mapping[str, float], duration_s: float, seed: int,
            shape: LengthShape = SHAREGPT) -> tuple[Arrival, ...]:
    """Independent Poisson arrivals per model over [0, duration_s). Drawn as
    their superposition: one Poisson stream of the total rate, each arrival's
    model chosen in proportion to the rates (the same process, and O(n))."""
    rng = np.random.default_rng(seed)
    names = sorted(m for m, r in rates.items() if r > 0)
    total = sum(rates[m] for m in names)
    if not names or duration_s <= 0:
        return ()
    n = int(rng.poisson(total * duration_s))
    times = rng.uniform(0.0, duration_s, n)
    which = rng.choice(len(names), size=n, p=np.array([rates[m] for m in names]) / total)
    return _with_lengths(times, [names[i] for i in which], rng, shape)


def gamma(rates: Mapping[str, float], cv: float, duration_s: float, seed: int,
          shape: LengthShape = SHAREGPT) -> tuple[Arrival, ...]:
    """Per model, Gamma inter-arrival times with mean 1/rate and coefficient
    of variation ``cv`` (shape 1/cv^2); cv = 1 is Poisson, larger is burstier."""
    if cv <= 0:
        raise ValueError(f"cv must be positive, got {cv}")
    rng = np.random.default_rng(seed)
    k = 1.0 / (cv * cv)
    times, models = [], []
    for m in sorted(rates):
        rate = rates[m]
        if rate <= 0:
            continue
        expect = rate * duration_s
        gaps = rng.gamma(k, 1.0 / (rate * k), int(expect + 10 * np.sqrt(expect + 1) + 10))
        t = np.cumsum(gaps)
        t = t[t < duration_s]
        times.append(t)
        models += [m] * len(t)
    all_times = np.concatenate(times) if times else np.array([])
    return _with_lengths(all_times, models, rng, shape)


def power_law_rates(models: Sequence[str], total_rate: float,
                    alpha: float) -> dict[str, float]:
    """rate_i proportional to (i+1)^-alpha, in the given order, summing to
    ``total_rate`` (alpha 0: uniform)."""
    weights = [(i + 1) ** -alpha for i in range(len(models))]
    s = sum(weights)
    return {m: total_rate * w / s for m, w in zip(models, weights)}


def aegaeon_catalog(n: int, profiles: Mapping[str, ModelProfile],
                    mix: Sequence[tuple[str, float]] = AEGAEON_MIX) -> list[ModelProfile]:
    """n served models aliased from the base models in Aegaeon's proportions
    (rounded, the rest to the first), named ``<base>#<i>``."""
    counts = [int(round(n * share)) for _, share in mix]
    counts[0] += n - sum(counts)
    out = []
    for (base, _), count in zip(mix, counts):
        out += [alias(profiles[base], f"{base}#{i:02d}") for i in range(count)]
    return out


def shift(trace: Sequence[Arrival], by_s: float) -> tuple[Arrival, ...]:
    return tuple(Arrival(a.time_s + by_s, a.model, a.input_tokens, a.output_tokens)
                 for a in trace)


def read_csv(path: str | Path) -> tuple[Arrival, ...]:
    """A trace file with the header ``time,model,input_tokens,output_tokens``
    (seconds, any model name, token counts). Errors name the line."""
    out = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: header must be {','.join(CSV_COLUMNS)}, "
                             f"got {','.join(reader.fieldnames or [])}")
        for line, row in enumerate(reader, start=2):
            try:
                a = Arrival(float(row["time"]), row["model"], int(row["input_tokens"]),
                            int(row["output_tokens"]))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line}: {e}") from None
            if a.time_s < 0 or a.input_tokens < 1 or a.output_tokens < 1 or not a.model:
                raise ValueError(f"{path}:{line}: need time >= 0, a model, and "
                                 f"input_tokens, output_tokens >= 1: {row}")
            out.append(a)
    return tuple(sorted(out, key=lambda a: a.time_s))


def write_csv(trace: Sequence[Arrival], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for a in trace:
            w.writerow([f"{a.time_s:.6f}", a.model, a.input_tokens, a.output_tokens])
