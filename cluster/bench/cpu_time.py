"""CPU time the servers spend, read from ``/proc``: a figure that a busy or
slow machine disturbs far less than throughput does.

``machine_cpu_s()`` is the CPU time every process on this machine has used
(user + system, from ``/proc/<pid>/stat``), minus this process's own (the
load generator runs here). Taken before and after a run, the difference
divided by the tokens served is the servers' CPU per output token, every
process of theirs included (engines, relays, Ray's raylet and GCS).
Processes that start and end within the run are missed, and anything else
running on the machine is counted: run benchmarks alone.
"""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: str) -> float:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rfind(")") + 2:].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def machine_cpu_s(skip_self: bool = True) -> float | None:
    """CPU seconds used so far by every other live process (and this one's
    too unless ``skip_self``); None off Linux."""
    if not os.path.isdir("/proc"):
        return None
    me, total = str(os.getpid()) if skip_self else None, 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            total += _proc_cpu_s(pid)
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return total
