"""Scaling fits: final loss against model size and against training compute, one power law per variant.

    L(x) = c + a · x^(−b),   x = active parameters, or training FLOPs (3 × forward FLOPs per token seen)

fitted by least squares (scipy's ``curve_fit``) on every finished run of a sweep that varies the model
size; the exponent b is reported with its standard error from the fit's covariance. A variant needs at
least 4 sizes (3 parameters and one degree of freedom for the error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import curve_fit

from sffn_lab.analysis.curves import TRAIN_FLOPS_PER_FORWARD, run_unit
from sffn_lab.analysis.report import collect, summarize_sweep
from sffn_lab.errors import UserError
from sffn_lab.markdown import markdown_table
from sffn_lab.run_dir import RunDir
from sffn_lab.units import metric_label

AXES = {"active_params": "active parameters", "train_flops": "training FLOPs"}
MIN_POINTS = 4


@dataclass
class PowerLaw:
    """L(x) = c + a · x^(−b), with the standard error of b."""

    a: float
    b: float
    c: float
    b_err: float

    def __call__(self, x):
        return self.c + self.a * np.power(x, -self.b)


def fit_power_law(x: list[float], y: list[float]) -> PowerLaw:
    """Least-squares fit of L = c + a·x^(−b) to points (x > 0), with x rescaled to its geometric mean."""
    if len(x) < MIN_POINTS:
        raise UserError(f"A power law with an offset needs at least {MIN_POINTS} sizes, got {len(x)}.")
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    scale = math.exp(np.log(xs).mean())

    def model(u, log_a, b, c):
        return c + np.exp(log_a - b * np.log(u))

    guess = (math.log(max(ys.max() - 0.9 * ys.min(), 1e-6)), 0.3, 0.9 * ys.min())
    params, cov = curve_fit(model, xs / scale, ys, p0=guess, maxfev=20000)
    log_a, b, c = params
    b_err = float(math.sqrt(cov[1, 1])) if np.isfinite(cov[1, 1]) else float("nan")
    return PowerLaw(a=math.exp(log_a) * scale**b, b=float(b), c=float(c), b_err=b_err)


@dataclass
class SizePoint:
    variant: str
    active_params: float
    train_flops: float
    loss: float  # mean over seeds of the final validation metric


def size_points(rows, run_dirs: dict[str, list[Path]]) -> list[SizePoint]:
    """One point per report row: its variant (the FFN kind, or the backbone for sMLP) and its costs."""
    points = []
    for row in rows:
        run_dir = run_dirs[row.name][0]
        summary = RunDir(run_dir).read_summary()
        model = yaml.safe_load(RunDir(run_dir).config.read_text())["model"]
        variant = model["ffn"]["kind"] if model["backbone"] == "transformer" else model["backbone"]
        flops = TRAIN_FLOPS_PER_FORWARD * summary["flops_per_token"] * summary["tokens_seen"]
        points.append(SizePoint(variant, row.active_params, flops, row.mean))
    return points


def fit_variants(points: list[SizePoint], axis: str) -> dict[str, PowerLaw]:
    """A power law per variant with at least ``MIN_POINTS`` sizes, against ``axis`` (a key of AXES)."""
    fits = {}
    for variant in sorted({p.variant for p in points}):
        mine = [p for p in points if p.variant == variant]
        if len({getattr(p, axis) for p in mine}) >= MIN_POINTS:
            fits[variant] = fit_power_law([getattr(p, axis) for p in mine], [p.loss for p in mine])
    return fits


def plot_scaling(points: list[SizePoint], output: Path, y_label: str) -> dict[str, dict[str, PowerLaw]]:
    """Points and fitted curves against active parameters and against training FLOPs (log x); returns the fits."""
    from sffn_lab.analysis.curves import line_styles
    from sffn_lab.analysis.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    variants = sorted({p.variant for p in points})
    fits = {}
    for ax, axis in zip(axes, AXES, strict=True):
        fits[axis] = fit_variants(points, axis)
        for variant, style in zip(variants, line_styles(len(variants)), strict=True):
            mine = sorted((p for p in points if p.variant == variant), key=lambda p: getattr(p, axis))
            xs = [getattr(p, axis) for p in mine]
            label = variant
            if variant in fits[axis]:
                law = fits[axis][variant]
                grid = np.geomspace(min(xs), max(xs), 50)
                ax.plot(grid, law(grid), color=style["color"], linestyle=style["linestyle"])
                label += f": b = {law.b:.2f} ± {law.b_err:.2f}"
            ax.plot(xs, [p.loss for p in mine], "o", color=style["color"], label=label)
        ax.set_xscale("log")
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Final {y_label} against model size: L = c + a·x^(−b) per variant (lower is better)")
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return fits


def write_scaling_report(*sweep_dirs: Path, out: Path) -> dict[str, dict[str, PowerLaw]]:
    """scaling.png and scaling.md in ``out``: every variant's fits against both axes."""
    rows = summarize_sweep(*sweep_dirs, baseline=None)
    runs = collect(*sweep_dirs)
    points = size_points(rows, runs)
    label = metric_label(rows[0].metric, run_unit(next(iter(runs.values()))[0]))
    out.mkdir(parents=True, exist_ok=True)
    fits = plot_scaling(points, out / "scaling.png", label)
    cells = [(variant, AXES[axis], str(len({getattr(p, axis) for p in points if p.variant == variant})),
              f"{law.b:.3f} ± {law.b_err:.3f}", f"{law.a:.4g}", f"{law.c:.4f}")
             for axis, by_variant in fits.items() for variant, law in by_variant.items()]
    lines = markdown_table(("variant", "against", "sizes", "b (exponent)", "a", "c (offset)"), cells)
    lines.append("")
    lines.append(f"L = c + a·x^(−b) per variant, least squares; ± one standard error. Variants with fewer than "
                 f"{MIN_POINTS} sizes are drawn but not fitted.")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    return fits
