"""Every PNG the toolkit draws, rendered from small inputs: a title, labelled axes, and no text cut off (each
text artist, and the figure's tight bounding box, inside the figure)."""

from __future__ import annotations

import pytest
import torch
from matplotlib.backend_bases import RendererBase
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from sffn_lab.analysis.curves import plot_runs
from sffn_lab.analysis.report import plot_sweep
from sffn_lab.analysis.scaling import SizePoint, plot_scaling
from sffn_lab.analysis.usage import plot_usage_heatmap
from sffn_lab.bench.plots import plot_ratios
from sffn_lab.bench.plots import plot_scaling as plot_bench_scaling
from sffn_lab.bench.records import Measurement
from sffn_lab.bench.scaling import BANK, LIMIT
from tests.test_compare import write_runs


@pytest.fixture
def saved_figures(monkeypatch) -> list[tuple[Figure, RendererBase]]:
    """The figures written with ``savefig``, each with the renderer that drew it as saved."""
    figures = []
    save = Figure.savefig

    def keep(fig, *args, **kwargs):
        save(fig, *args, **kwargs)
        fig.canvas.draw()
        figures.append((fig, fig.canvas.get_renderer()))

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def texts(fig: Figure, ticks: bool = True) -> list[Text]:
    """The figure's visible texts; ``ticks=False``: without tick labels (those of ticks outside the view are
    kept, undrawn, by matplotlib; drawn ones count in the tight bounding box)."""
    tick_labels = {id(label) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                   for tick in axis.get_major_ticks() + axis.get_minor_ticks() for label in (tick.label1, tick.label2)}
    return [t for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and (ticks or id(t) not in tick_labels)]


def inside(box: Bbox, frame: Bbox, tolerance: float) -> bool:
    return (box.x0 >= frame.x0 - tolerance and box.y0 >= frame.y0 - tolerance and box.x1 <= frame.x1 + tolerance
            and box.y1 <= frame.y1 + tolerance)


def assert_presentable(saved: tuple[Figure, RendererBase], *words: str) -> None:
    """A title; every text, and the tight bounding box of everything drawn, inside the figure; ``words`` shown."""
    fig, renderer = saved
    for text in texts(fig, ticks=False):
        box = text.get_window_extent(renderer)
        assert inside(box, fig.bbox, 1), f"text {text.get_text()!r} at {box} is cut off by the figure {fig.bbox}"
    tight = fig.get_tightbbox(renderer)  # inches
    assert inside(tight, Bbox.from_bounds(0, 0, *fig.get_size_inches()), 0.01), f"{tight} outside the figure"
    assert any(ax.get_title() for ax in fig.axes) or fig.get_suptitle(), "no title"
    shown = " ".join(t.get_text() for t in texts(fig))
    for word in words:
        assert word in shown, f"{word!r} not in the figure: {shown}"


def test_expert_usage_heatmap(tmp_path, saved_figures):
    plot_usage_heatmap({f"layer {i}": torch.rand(16) * 100 for i in range(2)}, tmp_path / "usage.png")
    assert_presentable(saved_figures[0], "share of the layer's", "expert", "Expert usage")


def test_run_curves_and_sweep_curves(tmp_path, saved_figures):
    sweep = tmp_path / "sweep"
    write_runs(sweep, "dense", {0: 2.0, 1: 2.1}, baseline="dense")
    write_runs(sweep, "sigma_moe", {0: 2.05, 1: 2.02})
    plot_runs([sweep / "dense-s0", sweep / "sigma_moe-s0"], tmp_path / "curves.png")
    plot_sweep((sweep,), tmp_path / "sweep.png")
    for fig in saved_figures:
        assert_presentable(fig, "bits per byte", "lower is better", "step")


def test_scaling_fit(tmp_path, saved_figures):
    points = [SizePoint(v, n, 6 * n * 1e6, 3.0 + 5 * n**-0.3 + (0.01 if v == "dense" else 0))
              for v in ("dense", "sigma_moe") for n in (1e4, 2e4, 4e4, 8e4, 1.6e5)]
    plot_scaling(points, tmp_path / "scaling.png", "validation bits per byte")
    assert_presentable(saved_figures[0], "bits per byte", "lower is better", "active parameters")


def test_bench_ratios_and_scaling(tmp_path, saved_figures):
    gshard = "GShard one-hot einsum (groups of 1024, capacity factor 1.25)"
    rows = [
        Measurement("layer", "T=4096 D=512", "sigma_moe", "time_ms", 40.0, 0.44, "dense"),
        Measurement("layer", "T=4096 D=512", "sigma_moe", "activation_MB", 30.0, 0.52, "dense"),
        Measurement("alternatives", "T=4096", "sffn kernel (auto)", "time_ms", 10.0, 1.0, "sffn kernel (auto)"),
        Measurement("alternatives", "T=4096", gshard, "time_ms", 40.0, 4.0, "sffn kernel (auto)"),
        Measurement("alternatives", "T=4096", "per-expert Python loop (boolean masks)", "time_ms", 30, 3.1,
                    "sffn kernel (auto)"),
        Measurement("lm", "default experiment, 2 layers, d_model 128, batch 32x128", "sigma_moe",
                    "train_tokens_per_s", 9e4, 0.81, "dense"),
    ]
    for label in ("N_E", "G", "K"):
        for x in (4, 8, 16):
            rows.append(Measurement(f"scaling_{label}", f"{label}={x}", BANK, "time_ms", x * 0.3,
                                    reference=f"{label}=4", x=x, note="T=4096 D=512; fp32"))
            rows.append(Measurement(f"scaling_{label}", f"{label}={x}", LIMIT, "time_ms", x * 0.2, x=x))
    plot_ratios(rows, tmp_path / "ratios.png")
    plot_bench_scaling(rows, tmp_path / "scaling.png")
    ratios, scaling = saved_figures
    assert_presentable(ratios, "capacity factor 1.25", "σ-MoE better", "ours faster", "1×")
    assert not any("10^" in t.get_text() for t in texts(ratios[0]))  # plain 0.5×, 2× ticks
    assert_presentable(scaling, "lower is better", "time (ms)")
