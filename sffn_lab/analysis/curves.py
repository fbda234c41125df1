"""Validation curves read from run directories (``metrics.csv``) and drawn into PNG files."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from sffn_lab.errors import UserError
from sffn_lab.run_dir import RunDir
from sffn_lab.units import METRIC_NAMES, metric_label

X_COLUMNS = {"steps": ("step", "step"), "tokens": ("tokens_seen", "tokens seen"), "time": ("elapsed_s", "seconds"),
             "flops": ("tokens_seen", "training FLOPs (3 × forward per token seen)")}
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward ≈ 3 forward passes


@dataclass
class Curve:
    label: str
    metric: str  # the y-axis name, e.g. "val/bits"
    x: list[float]
    y: list[float]
    unit: str | None = None  # what the metric is per (sffn_lab.units), None: not known yet


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """Rows of a run's metrics.csv as floats (empty cells dropped); later rows win for a repeated step."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no metrics.csv: is it a run directory of sffn train?")
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def run_unit(run_dir: Path) -> str | None:
    """The unit of a finished run's corpus (byte, word, token); None before its summary exists."""
    return RunDir(run_dir).read_summary().get("unit")


def run_corpus(run_dir: Path) -> str:
    """The corpus a run trained on, with the tokenizer that re-tokenizes it if any: ``wikitext103 (bpe:8000)``."""
    import yaml

    path = RunDir(run_dir).config
    data = (yaml.safe_load(path.read_text()) or {}).get("data", {}) if path.is_file() else {}
    corpus = str(data.get("corpus", "?"))
    return f"{corpus} ({data['tokenizer']})" if data.get("tokenizer") else corpus


def curve_metric(run_dir: Path) -> str:
    """Perplexity for word corpora, bits otherwise (both per token of the corpus' unit)."""
    return "val/ppl" if run_unit(run_dir) == "word" else "val/bits"


def validation_curve(run_dir: Path, x_axis: str = "steps", metric: str | None = None) -> Curve:
    """The validation curve of one run: one point per validation, de-duplicated by step. ``x_axis`` is
    steps, tokens seen, training wall time or training FLOPs (tokens seen × 3 × forward FLOPs per token)."""
    metric = metric or curve_metric(run_dir)
    x_key = X_COLUMNS[x_axis][0]
    scale = 1.0
    if x_axis == "flops":
        summary = RunDir(run_dir).read_summary()
        if not summary:
            raise UserError(f"'{run_dir}' has no summary.json, so its FLOPs per token are unknown.")
        scale = TRAIN_FLOPS_PER_FORWARD * summary["flops_per_token"]
    by_step: dict[float, tuple[float, float]] = {}
    for row in read_metrics(run_dir):
        if metric in row and x_key in row:
            by_step[row["step"]] = (row[x_key] * scale, row[metric])
    if not by_step:
        raise UserError(f"'{run_dir}' has no '{metric}' values against '{x_axis}' yet.")
    points = [by_step[s] for s in sorted(by_step)]
    return Curve(Path(run_dir).name, metric, [p[0] for p in points], [p[1] for p in points], run_unit(run_dir))


def value_at(curve: Curve, x: float) -> float:
    """The curve's metric at budget ``x``, linear between the validations around it (x within the curve)."""
    import numpy as np

    if not curve.x[0] <= x <= curve.x[-1]:
        raise UserError(f"{curve.label}: budget {x:.4g} lies outside its curve [{curve.x[0]:.4g}, {curve.x[-1]:.4g}].")
    return float(np.interp(x, curve.x, curve.y))


def line_styles(n: int) -> list[dict]:
    """Matplotlib keywords for ``n`` overlaid lines that all look different: tab10 colours (tab20 beyond
    10 lines), then dash patterns once the colours run out."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors
    dashes = ("-", "--", ":", "-.")
    return [{"color": palette[i % len(palette)], "linestyle": dashes[i // len(palette) % len(dashes)]}
            for i in range(n)]


def plot_runs(run_dirs: list[Path], output: Path, x_axis: str = "steps") -> None:
    """Overlay the validation curves of ``run_dirs`` in one labelled PNG."""
    from sffn_lab.analysis.plotting import pyplot

    plt = pyplot()

    curves = [validation_curve(r, x_axis) for r in run_dirs]
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for c, style in zip(curves, line_styles(len(curves)), strict=True):
        ax.plot(c.x, c.y, marker="o", markersize=3, label=c.label, **style)
    metric = curves[0].metric
    ax.set_xlabel(X_COLUMNS[x_axis][1])
    ax.set_ylabel(metric_label(metric, curves[0].unit))
    ax.set_title(f"Validation {METRIC_NAMES[metric]} of {len(curves)} run{'s' * (len(curves) > 1)} "
                 "(lower is better)")
    if metric == "val/ppl":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
