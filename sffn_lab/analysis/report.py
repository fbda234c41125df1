"""Sweep reports: mean ± std over seeds per run name, as a table, results.md / results.csv and a PNG.

A sweep directory holds one run directory per (run name, seed), named ``<name>-s<seed>``. Only
finished runs (with a summary.json) enter the report.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from sffn_lab.analysis.curves import line_styles, read_metrics, validation_curve
from sffn_lab.errors import UserError
from sffn_lab.run_dir import EVERY_TOKEN

RUN_DIR = re.compile(r"^(?P<name>.+)-s(?P<seed>\d+)$")


@dataclass
class Row:
    name: str
    seeds: list[int]
    metric: str  # "val/bits" (bits per character/token) or "val/ppl"
    mean: float
    std: float
    total_params: int
    active_params: int
    flops_per_token: int
    tokens_per_s: float
    usage_entropy: float | None  # mean over layers of the last validation's usage entropy (nats)
    dead_fraction: float | None
    scored: str = EVERY_TOKEN  # which tokens the metric covers (partial prediction: a subset)
    best: bool = False


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _last_usage(run_dir: Path, stat: str) -> float | None:
    rows = read_metrics(run_dir)
    keys = {k for r in rows for k in r if k.startswith("val_usage/") and k.endswith(f"/{stat}")}
    if not keys:
        return None
    last = [next(r[k] for r in reversed(rows) if k in r) for k in sorted(keys)]
    return statistics.fmean(last)


def collect(sweep_dir: Path) -> dict[str, list[Path]]:
    """Finished run directories grouped by run name."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"Sweep directory '{sweep_dir}' does not exist.")
    groups: dict[str, list[Path]] = {}
    for run_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        match = RUN_DIR.match(run_dir.name)
        if match and (run_dir / "summary.json").is_file():
            groups.setdefault(match["name"], []).append(run_dir)
    if not groups:
        raise UserError(f"'{sweep_dir}' holds no finished runs yet.")
    return groups


def summarize_sweep(sweep_dir: Path) -> list[Row]:
    rows = []
    for name, run_dirs in collect(sweep_dir).items():
        summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
        metric = "val/ppl" if summaries[0]["unit"] == "word" else "val/bits"
        values = [s["val_ppl"] if metric == "val/ppl" else s["val_bits"] for s in summaries]
        mean, std = _mean_std(values)
        entropies = [u for d in run_dirs if (u := _last_usage(d, "entropy")) is not None]
        dead = [u for d in run_dirs if (u := _last_usage(d, "dead_fraction")) is not None]
        rows.append(Row(
            name=name,
            seeds=[int(RUN_DIR.match(d.name)["seed"]) for d in run_dirs],
            metric=metric,
            mean=mean,
            std=std,
            total_params=summaries[0]["total_params"],
            active_params=summaries[0]["active_params"],
            flops_per_token=summaries[0]["flops_per_token"],
            tokens_per_s=statistics.fmean(s["tokens_seen"] / max(s["wall_time_s"], 1e-9) for s in summaries),
            usage_entropy=statistics.fmean(entropies) if entropies else None,
            dead_fraction=statistics.fmean(dead) if dead else None,
            scored=summaries[0].get("scored", EVERY_TOKEN),
        ))
    # the best run among those scored on every token: a subset of tokens is not comparable with them
    comparable = [r for r in rows if r.scored == EVERY_TOKEN] or rows
    min(comparable, key=lambda r: r.mean).best = True
    return rows


COLUMNS = ("run", "seeds", "metric", "mean ± std", "total params", "active params", "FLOPs/token", "tokens/s",
           "usage entropy", "dead experts")


def row_cells(row: Row) -> list[str]:
    label = "bpc/bits" if row.metric == "val/bits" else "ppl"
    return [
        row.name + (" ★" if row.best else "") + (" †" if row.scored != EVERY_TOKEN else ""),
        str(len(row.seeds)),
        label,
        f"{row.mean:.4f} ± {row.std:.4f}",
        f"{row.total_params:,}",
        f"{row.active_params:,}",
        f"{row.flops_per_token:,}",
        f"{row.tokens_per_s:,.0f}",
        "—" if row.usage_entropy is None else f"{row.usage_entropy:.3f}",
        "—" if row.dead_fraction is None else f"{row.dead_fraction:.1%}",
    ]


def write_report(sweep_dir: Path) -> list[Row]:
    """results.md, results.csv and curves.png in the sweep directory; returns the rows."""
    sweep_dir = Path(sweep_dir)
    rows = summarize_sweep(sweep_dir)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    notes = ["★ best mean validation metric among the runs scored on every token."]
    notes += [f"† {r.name}: scored on {r.scored}, not comparable digit by digit." for r in rows
              if r.scored != EVERY_TOKEN]
    (sweep_dir / "results.md").write_text("\n".join(lines) + "\n\n" + "\n".join(notes) + "\n")
    with (sweep_dir / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "seeds", "metric", "mean", "std", "total_params", "active_params",
                         "flops_per_token", "tokens_per_s", "usage_entropy", "dead_fraction", "scored", "best"])
        for r in rows:
            writer.writerow([r.name, " ".join(map(str, r.seeds)), r.metric, r.mean, r.std, r.total_params,
                             r.active_params, r.flops_per_token, r.tokens_per_s, r.usage_entropy, r.dead_fraction,
                             r.scored, r.best])
    plot_sweep(sweep_dir, sweep_dir / "curves.png")
    return rows


def plot_sweep(sweep_dir: Path, output: Path) -> None:
    """Validation curves, one line per run name: mean over seeds with a min–max band."""
    from sffn_lab.analysis.plotting import pyplot

    plt = pyplot()
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    metric = "val/bits"
    runs = collect(sweep_dir)
    for (name, run_dirs), style in zip(runs.items(), line_styles(len(runs)), strict=True):
        curves = [validation_curve(d) for d in run_dirs]
        metric = curves[0].metric
        steps = sorted(set.intersection(*(set(c.x) for c in curves)))
        ys = np.array([[dict(zip(c.x, c.y))[s] for s in steps] for c in curves])
        ax.plot(steps, ys.mean(0), marker="o", markersize=3, label=f"{name} (n={len(curves)})", **style)
        if len(curves) > 1:
            ax.fill_between(steps, ys.min(0), ys.max(0), color=style["color"], alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity" if metric == "val/ppl" else "validation bits per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
