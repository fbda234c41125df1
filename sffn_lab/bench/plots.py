"""PNG figures of a bench run: time against N_E, G and K, and the headline ratios (layer and LM against
dense, other MoE implementations against ours)."""

from __future__ import annotations

from pathlib import Path

from sffn_lab.bench.records import Measurement
from sffn_lab.bench.scaling import BANK, LIMIT


def plot_scaling(rows: list[Measurement], path: Path) -> None:
    """Time vs N_E, G and K (log-log), each against its ideal (flat for N_E, linear for G and K) and against
    the FLOP-matched dense FFN at each point (the limit)."""
    from sffn_lab.analysis.plotting import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
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
        ax.set_ylabel("fwd+bwd time (ms)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Expert bank scaling, {sweep[0].note.split(';')[0]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_ratios(rows: list[Measurement], path: Path) -> None:
    """Bars: σ-MoE/dense time and memory, the alternatives' time relative to ours, LM tokens/s ratios."""
    from sffn_lab.analysis.plotting import pyplot

    plt = pyplot()

    layer = [r for r in rows if r.section == "layer" and r.variant == "sigma_moe"]
    others = [r for r in rows if r.section == "alternatives" and r.variant != r.reference]
    bars = [(f"σ-MoE/dense {r.metric}", r.ratio) for r in layer]
    bars += [(f"{r.variant[:40]} / ours", r.ratio) for r in others]
    bars += [(f"LM tok/s σ-MoE/dense, {r.case[:22]}", r.ratio) for r in rows
             if r.section == "lm" and r.variant != "dense"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1))
    ax.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1])
    ax.axvline(1.0, color="k", lw=1)
    for i, (_, v) in enumerate(bars[::-1]):
        ax.text(v, i, f" {v:.2f}×", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ratio (log scale)")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
