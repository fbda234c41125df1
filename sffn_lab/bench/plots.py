"""PNG figures of a bench run: time against N_E, G and K, and the headline ratios (layer and LM against
dense, other MoE implementations against ours)."""

from __future__ import annotations

from pathlib import Path

from sffn_lab.bench.records import Measurement
from sffn_lab.bench.scaling import BANK, LIMIT

LAYER_METRICS = {"time_ms": "forward + backward time", "activation_MB": "activation memory"}


def plot_scaling(rows: list[Measurement], path: Path) -> None:
    """Time vs N_E, G and K (log-log), each against its ideal (flat for N_E, linear for G and K) and against
    the FLOP-matched dense FFN at each point (the limit)."""
    from sffn_lab.analysis.plotting import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(12, 4), layout="constrained")
    for ax, (label, ideal) in zip(axes, (("N_E", "flat"), ("G", "linear"), ("K", "linear")), strict=True):
        sweep = sorted((r for r in rows if r.section == f"scaling_{label}" and r.variant == BANK), key=lambda r: r.x)
        limit = sorted((r for r in rows if r.section == f"scaling_{label}" and r.variant == LIMIT), key=lambda r: r.x)
        xs, ts = [r.x for r in sweep], [r.value for r in sweep]
        base = next(r for r in sweep if r.case == r.reference)
        ax.plot(xs, ts, "o-", label="expert bank")
        ax.plot([r.x for r in limit], [r.value for r in limit], "s:", color="tab:green", label="FLOP-matched dense")
        ax.plot(xs, [base.value * (x / base.x if ideal == "linear" else 1.0) for x in xs], "k--", lw=1,
                label=f"ideal ({ideal})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("forward + backward time (ms)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Expert bank time against N_E, G and K (lower is better); {sweep[0].note.split(';')[0]}",
                 fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_ratios(rows: list[Measurement], path: Path) -> None:
    """Bars: σ-MoE/dense time and memory, the alternatives' time relative to ours, LM tokens/s ratios; each bar
    says on which side of 1 σ-MoE is better."""
    import textwrap

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from sffn_lab.analysis.plotting import pyplot

    plt = pyplot()

    layer = [r for r in rows if r.section == "layer" and r.variant == "sigma_moe"]
    others = [r for r in rows if r.section == "alternatives" and r.variant != r.reference]
    bars = [(f"σ-MoE / dense, {LAYER_METRICS.get(r.metric, r.metric)} (< 1: σ-MoE better)", r.ratio) for r in layer]
    bars += [(f"{r.variant} / ours, time (> 1: ours faster)", r.ratio) for r in others]
    bars += [(f"σ-MoE / dense LM training tokens/s, {r.case} (> 1: σ-MoE faster)", r.ratio) for r in rows
             if r.section == "lm" and r.variant != "dense"]
    labels = [textwrap.fill(label, 60) for label, _ in bars][::-1]
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(bars) + 1.5), layout="constrained")
    ax.barh(labels, [b[1] for b in bars][::-1])
    ax.axvline(1.0, color="k", lw=1)
    for i, (_, v) in enumerate(bars[::-1]):
        ax.text(v, i, f" {v:.2f}×", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15)  # room for the value after the longest bar
    ax.set_xlabel("ratio (log scale; 1× = equal)")
    ax.set_title("sffn bench: σ-MoE against dense and against other MoE implementations")
    ax.tick_params(axis="y", labelsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
