"""What a scenario's JSON looks like to a person: a Markdown table and plots.

The JSON on stdout is the result; these are views of it. Plots are PNGs
written with matplotlib (Agg, no display).
"""

from __future__ import annotations

from pathlib import Path


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def aegaeon_table(out: dict) -> str:
    rows = ["| system | GPUs for >=99% | cost $/h | sustainable rate (req/s/model) | "
            "attainment on 16 | goodput req/s on 16 | TTFT p99 s | TPOT p99 s |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in out["systems"].items():
        on = s["on_16_devices"]
        rows.append(f"| {name} | {_fmt(s['gpus_needed_99'])} | {_fmt(s['cost_per_hour_99'])} | "
                    f"{_fmt(s['sustainable_rate'])} | {_fmt(on['slo_attainment'])} | "
                    f"{_fmt(on['goodput_rps'])} | {_fmt(on['ttft_s_p99'])} | "
                    f"{_fmt(on['tpot_s_p99'])} |")
    g = out["goals"]
    rows += ["", f"shoal / dedicated GPUs: {_fmt(g['shoal_over_dedicated_gpus'])} "
                 f"(goal <= 0.18: {_fmt(g['shoal_gpus_at_most_0.18x_dedicated'])}); "
                 f"shoal / serverless rate: {_fmt(g['shoal_over_serverless_rate'])} "
                 f"(goal >= 2: {_fmt(g['shoal_rate_at_least_2x_serverless'])})"]
    return "\n".join(rows)


def mixed_table(out: dict) -> str:
    rows = ["| pool | devices | cost $/h |", "|---|---|---|"]
    for t, s in out["single_type"].items():
        rows.append(f"| {t} only | {_fmt(s['devices'])} | {_fmt(s['cost_per_hour'])}"
                    f"{'' if s['feasible'] else ' (vendor constraints forbid)'} |")
    if out.get("cheapest_mix"):
        mix = out["cheapest_mix"]
        rows.append(f"| mix {mix['pool']} | {sum(mix['pool'].values())} | "
                    f"{_fmt(mix['cost_per_hour'])} |")
    return "\n".join(rows)


def aegaeon_plots(out: dict, folder: str | Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    systems = out["systems"]
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))

    for key, xlabel, name in (("attainment_vs_rate", "arrival rate per model (req/s)",
                               "attainment_vs_rate.png"),
                              ("attainment_vs_models", "models", "attainment_vs_models.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for sys_name, s in systems.items():
            pts = sorted((float(x), y) for x, y in s[key].items() if y is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sys_name)
        ax.axhline(0.99, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{out['models']} models, 16 H800-class devices" if key.endswith("rate")
                     else f"{out['rate_per_model']} req/s per model, 16 devices")
        ax.legend()
        save(fig, name)
    for key, ylabel, name in (
            (lambda s: s["on_16_devices"]["goodput_rps"], "goodput (req/s within SLO), 16 devices",
             "goodput.png"),
            (lambda s: s["gpus_needed_99"], "devices for >= 99% attainment", "gpus_needed.png"),
            (lambda s: s["cost_per_hour_99"], "$ per hour at >= 99%", "cost_per_hour.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(systems)
        vals = [key(systems[n]) for n in names]
        ax.bar(names, [v or 0 for v in vals])
        for i, v in enumerate(vals):
            ax.text(i, v or 0, "not reached" if v is None else _fmt(v), ha="center",
                    va="bottom")
        ax.set_ylabel(ylabel)
        save(fig, name)
    return paths
