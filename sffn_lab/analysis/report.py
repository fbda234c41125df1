"""Sweep reports: mean ± std over seeds per run name, the difference to the baseline with a 95% confidence
interval and a verdict, as a table, results.md / results.csv and a PNG.

A sweep directory holds one run directory per (run name, seed), named ``<name>-s<seed>``, and the grid's
``sweep.json`` (its name and baseline). Only finished runs (with a summary.json) enter the report.
Several sweep directories merge into one table; a run name two of them share is prefixed with its
sweep's directory name, or with as many of its parent folders as tell the sweeps apart (``runs/grid`` and
``warm/grid`` for runs/grid and runs/warm/grid).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from sffn_lab.analysis.compare import Difference, difference
from sffn_lab.analysis.curves import X_COLUMNS, line_styles, read_metrics, validation_curve, value_at
from sffn_lab.errors import UserError
from sffn_lab.markdown import markdown_table
from sffn_lab.run_dir import EVERY_TOKEN, RunDir
from sffn_lab.units import METRIC_NAMES, metric_label

RUN_DIR = re.compile(r"^(?P<name>.+)-s(?P<seed>\d+)$")
SWEEP_FILE = "sweep.json"  # {"name": ..., "baseline": ..., "match": ...}, written by sffn ablate
LR_MARK = "@lr="  # a learning-rate search names its runs <variant>@lr=<lr>
TEST_FILE = "test.json"  # a learning-rate search scores each run's best checkpoint on the test split


@dataclass
class Row:
    name: str
    seeds: list[int]
    metric: str  # "val/bits" (bits per token of the corpus' unit) or "val/ppl"
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
    values: dict[int, float] | None = None  # final metric per seed
    is_baseline: bool = False
    vs_baseline: Difference | None = None  # None for the baseline, or with fewer than 2 seeds a side
    other_tokens: bool = False  # scored on other tokens than the baseline: not compared with it

    @property
    def verdict(self) -> str:
        if self.is_baseline:
            return "baseline"
        if self.other_tokens:
            return "not compared: other tokens scored"
        return self.vs_baseline.verdict if self.vs_baseline else "n < 2: no interval"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _last_usage(run_dir: Path, stat: str) -> float | None:
    rows = read_metrics(run_dir)
    keys = {k for r in rows for k in r if k.startswith("val_usage/") and k.endswith(f"/{stat}")}
    if not keys:
        return None
    last = [next(r[k] for r in reversed(rows) if k in r) for k in sorted(keys)]
    return statistics.fmean(last)


def _finished_runs(sweep_dir: Path) -> dict[str, list[Path]]:
    if not sweep_dir.is_dir():
        raise UserError(f"Sweep directory '{sweep_dir}' does not exist.")
    groups: dict[str, list[Path]] = {}
    for run_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        match = RUN_DIR.match(run_dir.name)
        if match and RunDir(run_dir).summary.is_file():
            groups.setdefault(match["name"], []).append(run_dir)
    return groups


def collect(*sweep_dirs: Path) -> dict[str, list[Path]]:
    """Finished run directories grouped by run name, over one or several sweeps."""
    per_sweep = {Path(d): _finished_runs(Path(d)) for d in sweep_dirs}
    labels = sweep_labels(list(per_sweep))
    names = [name for groups in per_sweep.values() for name in groups]
    groups = {}
    for sweep_dir, runs in per_sweep.items():
        for name, run_dirs in runs.items():
            groups[f"{labels[sweep_dir]}/{name}" if names.count(name) > 1 else name] = run_dirs
    if not groups:
        raise UserError(" ".join(_nothing_to_report(Path(d)) for d in sweep_dirs))
    return groups


def sweep_labels(sweep_dirs: list[Path]) -> dict[Path, str]:
    """Each sweep directory's shortest trailing path (its name, then with its parents) that no other of them
    shares; the same directory given twice is refused."""
    resolved = [d.resolve() for d in sweep_dirs]
    twice = {str(d) for d in sweep_dirs if resolved.count(d.resolve()) > 1}
    if twice:
        raise UserError(f"Sweep directory given twice: {', '.join(sorted(twice))}. Name each sweep once.")
    for depth in range(1, max(len(d.parts) for d in resolved) + 1):
        labels = ["/".join(d.parts[-depth:]).removeprefix("//") for d in resolved]
        if len(set(labels)) == len(labels):
            break
    return dict(zip(sweep_dirs, labels, strict=True))


def _nothing_to_report(folder: Path) -> str:
    """Why ``folder`` has no finished sweep runs: a sweep still running, a run directory, or other runs."""
    if (folder / SWEEP_FILE).is_file():
        return f"'{folder}' is a sweep with no finished runs yet."
    if RunDir(folder).is_run():
        return (f"'{folder}' is a run directory of sffn train, not a sweep of sffn ablate: plot it with  sffn plot "
                f"{folder}  or score it with  sffn eval {folder}")
    runs = sorted(p.name for p in folder.iterdir() if RunDir(p).is_run())
    if runs:
        return (f"'{folder}' holds {len(runs)} run directories of sffn train ({', '.join(runs[:3])}"
                f"{', …' if len(runs) > 3 else ''}), not a sweep of sffn ablate (no {SWEEP_FILE}): overlay them "
                f"with  sffn plot {folder}/*  or write a grid and run it with sffn ablate.")
    return f"'{folder}' is not a sweep directory of sffn ablate (no {SWEEP_FILE} and no run directories in it)."


def sweep_baseline(*sweep_dirs: Path) -> str | None:
    """The baseline run name the first sweep with a sweep.json names, or None."""
    for sweep_dir in sweep_dirs:
        spec = Path(sweep_dir) / SWEEP_FILE
        if spec.is_file():
            return json.loads(spec.read_text()).get("baseline")
    return None


def common_budget(groups: dict[str, list[Path]], budget: str) -> float:
    """The largest budget (steps, tokens, seconds or FLOPs) every run of every group has reached."""
    curves = [validation_curve(d, budget) for run_dirs in groups.values() for d in run_dirs]
    return min(c.x[-1] for c in curves)


def summarize_sweep(*sweep_dirs: Path, baseline: str | None = None, budget: str = "final") -> list[Row]:
    """One row per run name, baseline first, then the runs better than it, the undecided, the worse.

    ``budget``: each run's final validation metric ("final"), or its metric interpolated at the largest
    number of steps, tokens, seconds of training or training FLOPs that every run reached (equal budget).
    """
    rows = []
    groups = collect(*sweep_dirs)
    at = common_budget(groups, budget) if budget != "final" else None
    for name, run_dirs in groups.items():
        summaries = [RunDir(d).read_summary() for d in run_dirs]
        metric = "val/ppl" if summaries[0]["unit"] == "word" else "val/bits"
        if at is None:
            values = [s["val_ppl"] if metric == "val/ppl" else s["val_bits"] for s in summaries]
        else:
            values = [value_at(validation_curve(d, budget, metric), at) for d in run_dirs]
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
            values={int(RUN_DIR.match(d.name)["seed"]): v for d, v in zip(run_dirs, values, strict=True)},
        ))
    baseline = baseline or sweep_baseline(*sweep_dirs) or ("dense" if "dense" in groups else None)
    return compare_with(rows, baseline)


def compare_with(rows: list[Row], baseline: str | None) -> list[Row]:
    """Mark the best row and each row's difference to ``baseline``; sorted baseline, better, undecided, worse."""
    # the best run among those scored on every token: a subset of tokens is not comparable with them
    comparable = [r for r in rows if r.scored == EVERY_TOKEN] or rows
    min(comparable, key=lambda r: r.mean).best = True
    if baseline is None:
        return rows
    base = next((r for r in rows if r.name == baseline), None)
    if base is None:
        raise UserError(f"Baseline run '{baseline}' is not among the finished runs: {sorted(r.name for r in rows)}.")
    base.is_baseline = True
    for r in rows:
        if r.is_baseline:
            continue
        if r.scored == base.scored:
            r.vs_baseline = difference(r.values, base.values)
        else:
            r.other_tokens = True
    rank = {"baseline": 0, "better": 1, "worse": 3}
    return sorted(rows, key=lambda r: (rank.get(r.verdict, 2), r.mean))


def at_best_learning_rates(*sweep_dirs: Path, baseline: str | None = None) -> list[Row]:
    """A learning-rate search: each variant at the learning rate with its best mean validation metric,
    reported by its test metric (every seed's best checkpoint scored on the test split), compared with the
    baseline variant at its own best learning rate."""
    groups = collect(*sweep_dirs)
    by_variant: dict[str, list[Row]] = {}
    for row in summarize_sweep(*sweep_dirs, baseline=None):
        by_variant.setdefault(row.name.split(LR_MARK)[0], []).append(row)
    chosen = []
    for variant, candidates in by_variant.items():
        best = min(candidates, key=lambda r: r.mean)
        lr = best.name.split(LR_MARK)[1] if LR_MARK in best.name else "—"
        tests = {int(RUN_DIR.match(d.name)["seed"]): json.loads((d / TEST_FILE).read_text())
                 for d in groups[best.name] if (d / TEST_FILE).is_file()}
        if not tests:
            raise UserError(f"{best.name}: no {TEST_FILE} in its runs; rerun the grid with sffn ablate to score them.")
        key = "ppl" if best.metric == "val/ppl" else "bits"
        values = {seed: t[key] for seed, t in tests.items()}
        mean, std = _mean_std(list(values.values()))
        tried = ", ".join(r.name.split(LR_MARK)[1] for r in sorted(candidates, key=lambda r: r.name)
                          if LR_MARK in r.name)
        chosen.append(dataclasses.replace(
            best, name=f"{variant} (lr {lr} of {tried})", metric=best.metric.replace("val/", "test/"), mean=mean,
            std=std, values=values, seeds=sorted(values), best=False, is_baseline=False, vs_baseline=None))
    baseline = (baseline or sweep_baseline(*sweep_dirs) or "").split(LR_MARK)[0]
    reference = next((r.name for r in chosen if r.name.split(" (lr ")[0] == baseline), None)
    return compare_with(chosen, reference)


COLUMNS = ("run", "seeds", "metric", "mean ± std", "Δ vs baseline [95% CI]", "verdict", "total params",
           "active params", "FLOPs/token", "tokens/s", "usage entropy", "dead experts")


def _difference_cell(row: Row) -> str:
    d = row.vs_baseline
    if d is None:
        return "—"
    return f"{d.delta:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" + (" paired" if d.paired else " Welch")


def row_cells(row: Row) -> list[str]:
    label = "bpc/bits" if row.metric.endswith("bits") else "ppl"
    return [
        row.name + (" ★" if row.best else "") + (" †" if row.scored != EVERY_TOKEN else ""),
        str(len(row.seeds)),
        label,
        f"{row.mean:.4f} ± {row.std:.4f}",
        _difference_cell(row),
        row.verdict,
        f"{row.total_params:,}",
        f"{row.active_params:,}",
        f"{row.flops_per_token:,}",
        f"{row.tokens_per_s:,.0f}",
        "—" if row.usage_entropy is None else f"{row.usage_entropy:.3f}",
        "—" if row.dead_fraction is None else f"{row.dead_fraction:.1%}",
    ]


def write_report(*sweep_dirs: Path, out: Path | None = None, baseline: str | None = None,
                 budget: str = "final") -> list[Row]:
    """results.md, results.csv and curves.png in ``out`` (default: the one sweep directory); returns the rows.
    An equal-budget report (``budget`` other than "final") writes results_<budget>.md / .csv."""
    if out is None and len(sweep_dirs) > 1:
        raise UserError("Merging several sweeps needs --out, the directory for the merged report.")
    out = Path(out or sweep_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize_sweep(*sweep_dirs, baseline=baseline, budget=budget)
    stem = "results" if budget == "final" else f"results_{budget}"
    lines = markdown_table(COLUMNS, (row_cells(r) for r in rows))
    notes = ["★ best mean validation metric among the runs scored on every token.",
             "Δ: run − baseline, lower is better; 95% interval paired by seed when both ran the same seeds "
             "(t on the per-seed differences), Welch's otherwise; the verdict is 'better' or 'worse' only "
             "when the interval excludes 0."]
    if budget != "final":
        at = common_budget(collect(*sweep_dirs), budget)
        notes.append(f"Every value at equal {budget}: {at:.4g} {X_COLUMNS[budget][1]} (the most every run reached), "
                     "interpolated linearly between validations.")
    notes += [f"† {r.name}: scored on {r.scored}, not comparable digit by digit." for r in rows
              if r.scored != EVERY_TOKEN]
    if budget == "final" and any(LR_MARK in name for name in collect(*sweep_dirs)):
        best = at_best_learning_rates(*sweep_dirs, baseline=baseline)
        notes += ["", "Each variant at its own best learning rate (chosen on validation, scored on test):", "",
                  *markdown_table(COLUMNS, (row_cells(r) for r in best))]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n\n" + "\n".join(notes) + "\n")
    with (out / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "seeds", "metric", "mean", "std", "delta", "ci_low", "ci_high", "paired", "verdict",
                         "total_params", "active_params", "flops_per_token", "tokens_per_s", "usage_entropy",
                         "dead_fraction", "scored", "best"])
        for r in rows:
            d = r.vs_baseline
            writer.writerow([r.name, " ".join(map(str, r.seeds)), r.metric, r.mean, r.std,
                             *((d.delta, d.low, d.high, d.paired) if d else ("", "", "", "")), r.verdict,
                             r.total_params, r.active_params, r.flops_per_token, r.tokens_per_s, r.usage_entropy,
                             r.dead_fraction, r.scored, r.best])
    plot_sweep(sweep_dirs, out / ("curves.png" if budget == "final" else f"curves_{budget}.png"),
               "steps" if budget == "final" else budget)
    return rows


def plot_sweep(sweep_dirs: tuple[Path, ...], output: Path, x_axis: str = "steps") -> None:
    """Validation curves, one line per run name: mean over seeds with a min–max band."""
    from sffn_lab.analysis.plotting import pyplot

    plt = pyplot()
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    metric, unit = "val/bits", None
    runs = collect(*sweep_dirs)
    for (name, run_dirs), style in zip(runs.items(), line_styles(len(runs)), strict=True):
        curves = [validation_curve(d) for d in run_dirs]
        along = [validation_curve(d, x_axis) for d in run_dirs]  # the same validations, against x_axis
        metric, unit = curves[0].metric, curves[0].unit
        steps = sorted(set.intersection(*(set(c.x) for c in curves)))
        ys = np.array([[dict(zip(c.x, c.y, strict=True))[s] for s in steps] for c in curves])
        xs = np.array([[dict(zip(c.x, a.x, strict=True))[s] for s in steps]
                       for c, a in zip(curves, along, strict=True)])
        ax.plot(xs.mean(0), ys.mean(0), marker="o", markersize=3, label=f"{name} (n={len(curves)})", **style)
        if len(curves) > 1:
            ax.fill_between(xs.mean(0), ys.min(0), ys.max(0), color=style["color"], alpha=0.15)
    ax.set_xlabel(X_COLUMNS[x_axis][1])
    ax.set_ylabel(metric_label(metric, unit))
    ax.set_title(f"{', '.join(Path(d).name for d in sweep_dirs)}: validation {METRIC_NAMES[metric]} "
                 "(lower is better)\nmean over seeds, band: min to max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(output, dpi=120)
    plt.close(fig)
