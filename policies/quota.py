"""Decode time quotas for models time-sharing one device (Aegaeon, SOSP'25).

Pure arithmetic, used by the turn machine (``policies/turns.py``) that the
engine worker and the simulator both run. In one round every model i with
work decodes for ``quota_i``, and the device pays ``c0`` in switches.

- ``n_i = TPOT_SLO_i / step_i``: decode steps model i may take per SLO interval;
- ``alpha = max(c0 / (min n * max_round_s) + sum 1/n, slo_fraction)``;
- ``quota_i = c0 / (n_i * (alpha - sum 1/n))``.

Then the round lasts ``T = c0 * alpha / (alpha - sum 1/n)`` and model i makes
``quota_i / step_i`` tokens in it: its average TPOT is ``alpha * TPOT_SLO_i``.
``slo_fraction`` (Aegaeon: 0.5) keeps that at a fraction of the SLO; the
``max_round_s`` term stops rounds growing without bound as the device fills.
When ``sum 1/n >= 1`` no quotas meet the SLOs: the device is overloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Quotas:
    quota_s: Mapping[str, float]  # per model
    round_s: float  # the round they add up to, switches included
    load: float  # sum 1/n: the device share the models need; >= 1 is overload

    @property
    def overloaded(self) -> bool:
        return self.load >= 1.0


def decode_quotas(tpot_slo_s: Mapping[str, float], step_s: Mapping[str, float],
                  switch_s: float, slo_fraction: float = 0.5,
                  max_round_s: float = 4.0) -> Quotas:
    """Quotas for the models in ``tpot_slo_s`` (each needs a ``step_s``).

    ``switch_s`` is c0, the sum of the round's switch costs. With no switch
    cost there is nothing to amortize: every quota is ``max_round_s``.
    """
    if not tpot_slo_s:
        return Quotas({}, 0.0, 0.0)
    n = {m: max(tpot_slo_s[m] / step_s[m], 1.0) for m in tpot_slo_s}
    load = sum(1 / x for x in n.values())
    alpha = max(switch_s / (min(n.values()) * max_round_s) + load, slo_fraction)
    if switch_s <= 0 or alpha <= load:
        return Quotas({m: max_round_s for m in n}, max_round_s * len(n), load)
    quota = {m: switch_s / (n[m] * (alpha - load)) for m in n}
    return Quotas(quota, switch_s * alpha / (alpha - load), load)
