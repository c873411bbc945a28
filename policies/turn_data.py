"""What the turn machine (``policies/turns.py``) reads and says: its knobs,
the requests it tracks, what it learns, and its decisions. Plain data."""

from __future__ import annotations

from dataclasses import dataclass

TOKEN, AEGAEON, REQUEST = "token", "aegaeon", "request"
DISCIPLINES = (TOKEN, AEGAEON, REQUEST)
SWITCH_SHARE = 8  # "token": turns last ~8 switch costs, so switching stays under 1/8 of the time


@dataclass(frozen=True)
class TurnConfig:
    """The turn knobs (the catalog's ``TimeshareConfig``, as plain data)."""

    discipline: str = TOKEN
    # Aegaeon's alpha floor: quotas aim each model's mean TPOT at this fraction of its SLO.
    slo_fraction: float = 0.5
    # Aegaeon's bound on a round; "token" serves a model whose oldest request waited this long.
    max_round_s: float = 4.0
    # The shortest turn, and how often a "token" turn is judged again.
    min_quota_s: float = 0.01
    # The decode step assumed until one is measured.
    default_step_s: float = 0.02

    def __post_init__(self):
        if self.discipline not in DISCIPLINES:
            raise ValueError(f"discipline must be one of {DISCIPLINES}, got {self.discipline!r}")


@dataclass(eq=False)
class TurnRequest:
    """One request as the turn logic sees it.

    Mutable, and compared by identity, on purpose: the machine updates it on
    every output, and a driver subclasses it to carry its own I/O (the
    engine worker its output queue and engine task, the simulator its
    lengths), so both drivers and the machine share one record per request.
    """

    rid: str
    model: str
    arrived: float
    max_tokens: int  # its whole budget
    generated: int = 0  # tokens delivered so far
    first_at: float | None = None  # when its first token came
    in_engine: bool = False  # started by a turn and not preempted since
    segments: int = 0  # engine segments it has had (1 + resumes)
    seg_start_tokens: int = 0  # tokens it had when its current segment started
    seg_prev_at: float | None = None  # the previous output of its current segment

    @property
    def new(self) -> bool:
        """Never run yet: waiting for its prefill."""
        return self.segments == 0


@dataclass
class Estimate:
    """What the machine has learnt about one model; mutable, updated by events."""

    step_s: float | None = None  # decode step time of the model's batch
    switch_s: float | None = None  # swap + re-prefill until its first token after a switch
    quota_s: float = 0.0  # the last quota given (aegaeon, request)
    last_turn_end: float = 0.0


@dataclass
class Totals:
    """Counters over the machine's life, for stats and benchmarks."""

    switches: int = 0
    swap_s: float = 0.0  # weight swaps
    restart_s: float = 0.0  # after a swap, until the first resumed token
    busy_s: float = 0.0  # turns, switches included
    preemptions: int = 0


@dataclass(frozen=True)
class Keep:
    """The turn goes on; judge it again after ``wait_s`` or at the next
    arrival or departure, whichever comes first (None: only then)."""

    wait_s: float | None


@dataclass(frozen=True)
class EndTurn:
    """The turn is over: preempt the model's requests. ``next`` is the model
    chosen to go next ("token" decides it while judging), else None."""

    next: str | None = None
