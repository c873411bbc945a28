"""``shoal status``: the cluster as tables that stay readable with a big catalog.

Devices show how many copies they hold in each state, not their names; the
per-model table can be filtered by name, state and device. A model's STATE
and its WHERE column come from the same copies (``cluster/control/status.py``),
so they never contradict each other.
"""

from __future__ import annotations

import fnmatch
from collections import Counter


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _counts(states: dict[str, int]) -> str:
    total = sum(states.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{n} {s}" for s, n in states.items()) + ")"


def select(models: list[dict], name: str | None = None, state: str | None = None,
           device: str | None = None) -> list[dict]:
    """Models matching every filter given: a glob on the name, a model state
    (active, loading, parked, cold) and a device holding a copy."""
    return [m for m in models
            if (name is None or fnmatch.fnmatchcase(m["name"], name))
            and (state is None or m["state"] == state)
            and (device is None or device in m["devices"])]


def status_table(status: dict, name: str | None = None, state: str | None = None,
                 device: str | None = None, show_models: bool = True) -> str:
    devs = [["DEVICE", "NODE", "ACCELERATOR", "ALIVE", "USED MiB", "BUDGET MiB", "MODELS"]]
    for d in status["devices"]:
        devs.append([d["id"], (d["node"] or "")[:8], d["accelerator_type"] or d["kind"],
                     "yes" if d["alive"] else "NO", _mib(d["memory_used_bytes"]),
                     _mib(d["memory_budget_bytes"]), _counts(d.get("model_states", {}))])
    by_state = Counter(m["state"] for m in status["models"])
    summary = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
    out = [f"policy {status['policy']}, routes v{status['version']}",
           f"{len(status['models'])} models: {summary}", "", _table(devs)]
    if show_models:
        chosen = select(status["models"], name, state, device)
        rows = [["MODEL", "FAMILY", "STATE", "REPLICAS", "QUEUE", "WHERE"]]
        for m in chosen:
            where = ",".join(f"{dev}:{st}" for dev, st in m["devices"].items()) or "-"
            rows.append([m["name"], m["family"], m["state"], str(m["replicas"]),
                         str(m["queue"]), where])
        out += ["", _table(rows) if chosen else "no model matches the filters"]
        if len(chosen) < len(status["models"]):
            out.append(f"({len(chosen)} of {len(status['models'])} models shown)")
    problems = status.get("problems") or {}
    if problems:
        out += ["", "problems:"] + [f"  {m}: {why}" for m, why in problems.items()]
    return "\n".join(out)
