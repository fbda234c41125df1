"""Expert-usage statistics from assignment counts, and the layer × expert heatmap."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def usage_stats(counts: torch.Tensor) -> dict[str, float]:
    """counts [N_E] of (token, slot) assignments → entropy (nats), perplexity / N_E, dead fraction, loads.

    ``perplexity`` is exp(entropy) / N_E: 1 for perfectly uniform use, 1/N_E when one expert takes all.
    ``max_load`` is the busiest expert's count over the mean count (1 when balanced).
    """
    counts = counts.double()
    n = counts.numel()
    total = counts.sum()
    if total <= 0:
        return {"entropy": 0.0, "perplexity": 0.0, "dead_fraction": 1.0, "max_load": 0.0}
    p = counts / total
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {
        "entropy": entropy,
        "perplexity": math.exp(entropy) / n,
        "dead_fraction": float((counts == 0).double().mean()),
        "max_load": float(counts.max() / (total / n)),
    }


def plot_usage_heatmap(usage: dict[str, torch.Tensor], path: Path) -> None:
    """One row per layer (label → counts [N_E]), colour = share of that layer's assignments."""
    from sffn_lab.analysis.plotting import pyplot

    plt = pyplot()

    width = max(c.numel() for c in usage.values())
    grid = torch.full((len(usage), width), float("nan"))
    for row, counts in enumerate(usage.values()):
        grid[row, : counts.numel()] = counts.float() / counts.sum().clamp_min(1)
    fig, ax = plt.subplots(figsize=(min(14, 4 + 0.25 * width), 2.2 + 0.4 * len(usage)), layout="constrained")
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(usage)), list(usage))
    ax.set_xlabel("expert")
    ax.set_title(f"Expert usage at the last validation (even: 1/{width} each)")
    fig.colorbar(image, ax=ax, label="share of the layer's\nassignments")
    fig.savefig(path, dpi=110)
    plt.close(fig)
