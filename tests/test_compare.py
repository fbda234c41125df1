"""The difference to the baseline with its 95% interval: a worked example by hand, scipy's own tests, and
the report that orders runs by verdict and merges sweeps."""

from __future__ import annotations

import json

import pytest
from scipy import stats

from sffn_lab.analysis.compare import difference
from sffn_lab.errors import UserError


def test_paired_interval_worked_by_hand():
    # per-seed differences −0.10, −0.05, −0.10: mean −0.08333, sd 0.028868, se 0.016667, t(0.975, 2) = 4.302653
    d = difference({0: 1.90, 1: 2.05, 2: 2.10}, {0: 2.00, 1: 2.10, 2: 2.20})
    assert d.paired and d.n == 3
    assert d.delta == pytest.approx(-0.0833333, abs=1e-6)
    assert (d.low, d.high) == pytest.approx((-0.0833333 - 0.0717109, -0.0833333 + 0.0717109), abs=1e-6)
    assert d.verdict == "better"


def test_paired_and_welch_agree_with_scipy():
    run, base = {0: 2.31, 1: 2.27, 2: 2.35, 3: 2.30}, {0: 2.29, 1: 2.30, 2: 2.33, 3: 2.27}
    d = difference(run, base)
    want = stats.ttest_rel(list(run.values()), list(base.values())).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((want.low, want.high), rel=1e-9)
    assert d.verdict == "no difference at n = 4"
    unpaired = difference({0: 2.31, 1: 2.27, 2: 2.35}, {5: 2.50, 6: 2.46, 7: 2.52, 8: 2.49})
    want = stats.ttest_ind([2.31, 2.27, 2.35], [2.50, 2.46, 2.52, 2.49], equal_var=False).confidence_interval(0.95)
    assert not unpaired.paired and (unpaired.low, unpaired.high) == pytest.approx((want.low, want.high), rel=1e-9)
    assert unpaired.verdict == "better"
    assert difference({0: 2.5, 1: 2.6}, {0: 2.0, 1: 2.1}).verdict == "worse"
    assert difference({0: 2.5}, {0: 2.0, 1: 2.1}) is None  # one seed: no spread, no interval


def write_runs(sweep, name, values, baseline=None):
    sweep.mkdir(exist_ok=True)
    if baseline:
        (sweep / "sweep.json").write_text(json.dumps({"name": sweep.name, "baseline": baseline}))
    for seed, bits in values.items():
        run = sweep / f"{name}-s{seed}"
        run.mkdir()
        (run / "metrics.csv").write_text(f"step,val/bits\n10,{bits + 1}\n20,{bits}\n")
        (run / "summary.json").write_text(json.dumps({
            "unit": "byte", "val_bits": bits, "total_params": 10, "active_params": 5, "flops_per_token": 20,
            "tokens_seen": 100, "wall_time_s": 1.0}))


def test_report_orders_by_verdict_and_merges_sweeps(tmp_path):
    from sffn_lab.analysis.report import summarize_sweep, write_report

    a, b = tmp_path / "a", tmp_path / "b"
    write_runs(a, "ref", {0: 2.00, 1: 2.10, 2: 2.20}, baseline="ref")
    write_runs(a, "worse", {0: 2.30, 1: 2.41, 2: 2.50})
    write_runs(a, "same", {0: 1.95, 1: 2.20, 2: 2.15})
    write_runs(b, "better", {0: 1.90, 1: 2.05, 2: 2.10})
    write_runs(b, "same", {0: 2.02, 1: 2.05, 2: 2.20})
    rows = summarize_sweep(a, b)
    assert [(r.name, r.verdict) for r in rows] == [
        ("ref", "baseline"), ("better", "better"), ("b/same", "no difference at n = 3"),
        ("a/same", "no difference at n = 3"), ("worse", "worse")]
    with pytest.raises(Exception, match="--out"):
        write_report(a, b)
    write_report(a, b, out=tmp_path / "merged")
    csv_text = (tmp_path / "merged" / "results.csv").read_text()
    assert "verdict" in csv_text.splitlines()[0] and ",better," in csv_text
    assert summarize_sweep(a, baseline="worse")[0].name == "worse"


def test_sweeps_of_the_same_name_merge_under_their_parent_folders(tmp_path):
    """A grid rerun into another --out folder keeps its name: its runs are told apart by the folders above,
    not merged into (or overwriting) the first sweep's; the same sweep twice is refused."""
    from sffn_lab.analysis.report import summarize_sweep

    first, rerun = tmp_path / "runs" / "grid", tmp_path / "runs" / "warm" / "grid"
    first.parent.mkdir()
    rerun.parent.mkdir()
    write_runs(first, "ref", {0: 2.00, 1: 2.10, 2: 2.20}, baseline="ref")
    write_runs(first, "base", {0: 2.30, 1: 2.41, 2: 2.50})
    write_runs(rerun, "base", {0: 1.90, 1: 2.05, 2: 2.10})
    rows = {r.name: r for r in summarize_sweep(first, rerun)}
    assert set(rows) == {"ref", "runs/grid/base", "warm/grid/base"}
    assert rows["warm/grid/base"].verdict == "better" and rows["runs/grid/base"].verdict == "worse"
    with pytest.raises(UserError, match="given twice"):
        summarize_sweep(first, tmp_path / "runs" / ".." / "runs" / "grid")


def test_equal_budget_values_are_interpolated_at_what_every_run_reached(tmp_path):
    """Run a: validations every 1000 tokens at 10 FLOPs/token; run b: every 500 tokens at 40 FLOPs/token.
    Equal steps (20): a 2.0, b 2.5; equal tokens (1500): a 2.5, b 2.0; equal training FLOPs (a's most:
    3·10·2000 = 60,000, b's first validation, at 500 tokens): a 2.0, b 3.0."""
    from sffn_lab.analysis.report import summarize_sweep, write_report

    for name, rows, fpt in [("a", [(10, 1000, 3.0), (20, 2000, 2.0)], 10),
                            ("b", [(10, 500, 3.0), (20, 1000, 2.5), (30, 1500, 2.0)], 40)]:
        run = tmp_path / f"{name}-s0"
        run.mkdir()
        lines = ["step,tokens_seen,elapsed_s,val/bits"] + [f"{s},{t},{s / 10},{b}" for s, t, b in rows]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
        (run / "summary.json").write_text(json.dumps({
            "unit": "byte", "val_bits": rows[-1][2], "total_params": 10, "active_params": 5, "flops_per_token": fpt,
            "tokens_seen": rows[-1][1], "wall_time_s": 1.0}))

    def at(budget):
        return {r.name: r.mean for r in summarize_sweep(tmp_path, baseline="a", budget=budget)}

    assert at("final") == {"a": 2.0, "b": 2.0}
    assert at("steps") == {"a": 2.0, "b": 2.5}
    assert at("tokens") == {"a": pytest.approx(2.5), "b": 2.0}
    assert at("time") == {"a": 2.0, "b": 2.5}
    assert at("flops") == {"a": 2.0, "b": 3.0}
    write_report(tmp_path, baseline="a", budget="tokens")
    assert "equal tokens: 1500" in (tmp_path / "results_tokens.md").read_text()
    assert (tmp_path / "curves_tokens.png").stat().st_size > 0


def test_learning_rate_search_chooses_on_validation_and_reports_test(tmp_path):
    """dense is best at lr 1e-3 on validation, σ-MoE at 4e-3; their test values at those rates are compared,
    whatever the test values at the other rates (lr 4e-3's dense test values are lower, but not chosen)."""
    from sffn_lab.analysis.report import at_best_learning_rates, write_report

    (tmp_path / "sweep.json").write_text(json.dumps({"name": "lr", "baseline": "dense@lr=0.001"}))
    table = {("dense", "0.001"): (2.0, 2.30), ("dense", "0.004"): (2.2, 2.10),
             ("sigma_moe", "0.001"): (2.4, 2.50), ("sigma_moe", "0.004"): (2.1, 2.40)}
    for (variant, lr), (val, test) in table.items():
        for seed in (0, 1, 2):
            run = tmp_path / f"{variant}@lr={lr}-s{seed}"
            run.mkdir()
            (run / "metrics.csv").write_text(f"step,val/bits\n10,{val}\n")
            (run / "summary.json").write_text(json.dumps({
                "unit": "byte", "val_bits": val + seed / 100, "total_params": 10, "active_params": 5,
                "flops_per_token": 20, "tokens_seen": 100, "wall_time_s": 1.0}))
            (run / "test.json").write_text(json.dumps({"bits": test + seed / 50}))
    rows = at_best_learning_rates(tmp_path)
    assert [r.name for r in rows] == ["dense (lr 0.001 of 0.001, 0.004)", "sigma_moe (lr 0.004 of 0.001, 0.004)"]
    assert rows[0].is_baseline and rows[0].mean == pytest.approx(2.32) and rows[0].metric == "test/bits"
    assert rows[1].vs_baseline.delta == pytest.approx(0.10) and rows[1].verdict == "worse"  # paired, equal spread
    write_report(tmp_path)
    assert "Each variant at its own best learning rate" in (tmp_path / "results.md").read_text()


def test_a_grid_with_learning_rates_runs_every_variant_at_each(tmp_path):
    from sffn_lab.ablation import load_grid

    grid = tmp_path / "grid.yaml"
    grid.write_text("name: lr\nbaseline: dense\nmatch: param_equal\nlrs: [1e-3, 4e-3]\nruns:\n"
                    "  - {name: dense, set: ['model.ffn.kind=dense']}\n"
                    "  - {name: moe, set: ['model.ffn.kind=sigma_moe', 'model.ffn.expert_size=64']}\n")
    sweep = load_grid(grid)
    assert [(r.name, r.config.train.lr) for r in sweep.runs] == [
        ("dense@lr=0.001", 1e-3), ("dense@lr=0.004", 4e-3), ("moe@lr=0.001", 1e-3), ("moe@lr=0.004", 4e-3)]
    assert sweep.baseline == "dense@lr=0.001" and all(r.evaluate_test for r in sweep.runs)
