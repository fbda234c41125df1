"""`sffn ablate` / `sffn report` end to end on a tiny grid: plan, matching, skip, resume, aggregate."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from sffn_lab.ablation import load_grid
from sffn_lab.errors import UserError
from tests.support import TINY, run_cli

GRID_SETTINGS = [*TINY, "train.val_every=4", "train.max_steps=8", "train.warmup_steps=2", "train.checkpoint_every=2"]


def write_grid(tmp_path: Path, runs: list[dict], **extra) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "set": GRID_SETTINGS, "seeds": [0, 1], "runs": runs, **extra}))
    return path


RUNS = [{"name": "dense", "set": ["model.ffn.kind=dense"]},
        {"name": "sigma_moe", "set": ["model.ffn.kind=sigma_moe", "model.ffn.expert_size=16"]}]


def test_grid_runs_skips_finished_resumes_interrupted_and_reports(tmp_path, capsys):
    grid = write_grid(tmp_path, RUNS)
    code, out, err = run_cli(["ablate", grid, "--out", tmp_path / "sweeps"], capsys)
    assert code == 0, err
    sweep = tmp_path / "sweeps" / "tiny"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["dense-s0", "dense-s1", "sigma_moe-s0",
                                                                       "sigma_moe-s1"]
    moe_cfg = yaml.safe_load((sweep / "sigma_moe-s0" / "config.yaml").read_text())
    assert moe_cfg["model"]["ffn"]["n_experts"] == 4 and moe_cfg["train"]["seed"] == 0  # N_E·G = d_ff derived
    rows = {r["run"]: r for r in csv.DictReader((sweep / "results.csv").open())}
    assert set(rows) == {"dense", "sigma_moe"} and rows["dense"]["seeds"] == "0 1"
    finals = [json.loads((sweep / f"dense-s{s}" / "summary.json").read_text())["val_bits"] for s in (0, 1)]
    assert float(rows["dense"]["mean"]) == pytest.approx(sum(finals) / 2, rel=1e-9)
    assert (sweep / "results.md").read_text().count("★") == 2 and (sweep / "curves.png").stat().st_size > 5000

    # a rerun trains nothing; a run cut short after a checkpoint is resumed, a run never checkpointed restarts
    interrupted = sweep / "sigma_moe-s1"
    (interrupted / "summary.json").unlink()
    (interrupted / "status.json").write_text(json.dumps({"status": "interrupted", "step": 4}))
    code, out, err = run_cli(["ablate", grid, "--out", tmp_path / "sweeps"], capsys)
    assert code == 0, err
    assert out.count(": skipped") == 3 and "sigma_moe-s1: resumed" in out
    assert json.loads((interrupted / "summary.json").read_text())["step"] == 8

    code, out, err = run_cli(["report", sweep], capsys)
    assert code == 0 and "sigma_moe" in out


def test_a_grid_that_breaks_the_matching_rule_is_refused(tmp_path, capsys):
    runs = [*RUNS, {"name": "big", "set": ["model.ffn.kind=dense", "model.ffn.d_ff=128"]}]
    code, _, err = run_cli(["ablate", write_grid(tmp_path, runs), "--out", tmp_path / "sweeps"], capsys)
    assert code == 2 and "breaks its matching rule" in err and "big" in err
    assert not (tmp_path / "sweeps").exists()
    runs = [*RUNS, {"name": "moe_nodiv", "set": ["model.ffn.kind=sigma_moe", "model.ffn.expert_size=24"]}]
    with pytest.raises(UserError, match="does not divide"):
        load_grid(write_grid(tmp_path, runs))


def test_compute_equal_grid_and_cross_product(tmp_path):
    grid = write_grid(tmp_path, [{"name": "dense", "set": []}], match="compute_equal",
                      grid={"model.ffn.kind": ["sigma_moe"], "model.ffn.top_k": [1, 2]})
    sweep = load_grid(grid)
    names = sorted({r.name for r in sweep.runs})
    assert names == ["dense", "kind=sigma_moe,top_k=1", "kind=sigma_moe,top_k=2"]
    flops = {r.name: r.flops_per_token for r in sweep.runs}
    assert all(abs(f / flops["dense"] - 1) <= 0.02 for f in flops.values())


EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_shipped_experiment_loads_and_every_grid_meets_its_matching_rule(path, monkeypatch, tmp_path):
    from sffn_lab.config import load_config

    monkeypatch.setenv("SFFN_DATA", str(tmp_path))  # plans word-level grids without a downloaded corpus
    spec = yaml.safe_load(path.read_text())
    if "runs" in spec or "grid" in spec:
        sweep = load_grid(path)
        assert sweep.runs and {r.name for r in sweep.runs} >= {sweep.baseline}
    else:
        assert load_config(path, []).name == spec["name"]


def test_report_marks_runs_scored_on_part_of_the_tokens_and_never_calls_them_best(tmp_path):
    from sffn_lab.analysis.report import summarize_sweep

    partial = "the last 80% of each 128-token window only (partial prediction)"
    for name, bits, scored in [("full", 2.5, None), ("partial", 2.0, partial)]:
        for seed in (0, 1):
            run = tmp_path / f"{name}-s{seed}"
            run.mkdir()
            (run / "metrics.csv").write_text("step,val/bits\n10,3.0\n")
            summary = {"unit": "byte", "val_bits": bits + seed / 10, "total_params": 10, "active_params": 5,
                       "flops_per_token": 20, "tokens_seen": 100, "wall_time_s": 1.0}
            if scored:
                summary["scored"] = scored
            (run / "summary.json").write_text(json.dumps(summary))
    rows = {r.name: r for r in summarize_sweep(tmp_path)}
    assert rows["full"].best and not rows["partial"].best  # 2.0 < 2.5, but over other tokens
    assert rows["partial"].scored == partial and rows["full"].mean == pytest.approx(2.55)
    rows = {r.name: r for r in summarize_sweep(tmp_path, baseline="full")}
    assert rows["partial"].vs_baseline is None and rows["partial"].verdict == "not compared: other tokens scored"


@pytest.mark.parametrize("n", [1, 10, 12, 45])
def test_overlaid_lines_never_share_a_colour_and_dash_pattern(n):
    from sffn_lab.analysis.curves import line_styles

    styles = {(s["color"], s["linestyle"]) for s in line_styles(n)}
    assert len(styles) == n


def test_each_parallel_job_claims_its_own_gpu(monkeypatch):
    import queue

    from sffn_lab.ablation import claim_gpu

    ids = queue.Queue()
    for gpu in (0, 1):
        ids.put(gpu)
    seen = []
    for _ in range(2):
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        claim_gpu(ids)
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["0", "1"]


def test_a_learning_rate_search_scores_every_run_on_test_and_reports_the_best(tmp_path, capsys):
    grid = write_grid(tmp_path, RUNS, lrs=[1e-3, 3e-3], seeds=[0])
    code, _, err = run_cli(["ablate", grid, "--out", tmp_path / "sweeps"], capsys)
    assert code == 0, err
    sweep = tmp_path / "sweeps" / "tiny"
    for run in ("dense@lr=0.001-s0", "dense@lr=0.003-s0", "sigma_moe@lr=0.001-s0", "sigma_moe@lr=0.003-s0"):
        scored = json.loads((sweep / run / "test.json").read_text())
        assert scored["split"] == "test" and scored["tokens"] > 0
    assert json.loads((sweep / "sweep.json").read_text())["baseline"] == "dense@lr=0.001"
    report = (sweep / "results.md").read_text()
    assert "Each variant at its own best learning rate" in report and "(lr 0.00" in report


@pytest.mark.parametrize("config", ["default", "default.yaml", "base.yaml", "sub/../base.yaml", "{absolute}"])
def test_a_grids_config_is_resolved_like_train_c_relative_to_the_grid(tmp_path, monkeypatch, config):
    """A grid outside experiments/: a shipped name, a path relative to the grid file, an absolute path; never
    the working directory."""
    from sffn_lab.config import load_config
    from sffn_lab.experiments import DEFAULT_CONFIG

    folder = tmp_path / "grids"
    (folder / "sub").mkdir(parents=True)
    (folder / "base.yaml").write_text(DEFAULT_CONFIG.read_text())
    monkeypatch.chdir(tmp_path)  # where a working-directory lookup would look: nothing there
    grid = folder / "grid.yaml"
    grid.write_text(yaml.safe_dump({"config": config.format(absolute=folder / "base.yaml"), "match": "none",
                                    "runs": [{"name": "dense", "set": ["model.ffn.kind=dense"]}]}))
    sweep = load_grid(grid)
    assert sweep.base_config.read_text() == DEFAULT_CONFIG.read_text()
    assert sweep.runs[0].config.model == load_config(DEFAULT_CONFIG, ["model.ffn.kind=dense"]).model


def test_a_grids_missing_config_is_named_with_where_it_was_looked_for(tmp_path):
    grid = write_grid(tmp_path, RUNS, config="nosuch.yaml")
    with pytest.raises(UserError, match=r"config 'nosuch.yaml' is neither a file \(looked for '.*grid.*nosuch"):
        load_grid(grid)


def test_grid_plan_names_its_base_durations_and_total(tmp_path, capsys, monkeypatch):
    from sffn_lab import ablation

    def fake_estimates(sweep, sweep_dir):
        for run, seconds in zip(sweep.runs, [7040, 7.05e6, 65, 4.2], strict=True):
            run.estimated_s = seconds

    monkeypatch.setattr(ablation, "estimate_seconds", fake_estimates)
    code, out, err = run_cli(["ablate", write_grid(tmp_path, RUNS), "--dry-run", "--out", tmp_path / "s"], capsys)
    assert code == 0, err
    assert "built-in defaults" in out and "no config:" in out
    assert "1 h 57 min" in out and "81 d 14 h" in out and "1 min 5 s" in out and "4.2 s" in out and "e+" not in out
    total = next(line for line in out.splitlines() if line.startswith("│ total"))
    assert "81 d 16 h" in total  # 7040 + 7.05e6 + 65 + 4.2 s


def test_finished_seeds_time_the_rest_of_their_run(tmp_path, capsys, monkeypatch):
    """A finished run shows the time it took; another seed of it is estimated from that time per token; a run
    with nothing finished is measured; the plan adds what is left."""
    from sffn_lab import ablation
    from sffn_lab.run_dir import RunDir

    measured = []

    def measured_seconds_per_token(config, flops_per_token):
        measured.append(config.model.ffn.kind)
        return 1e-3

    monkeypatch.setattr(ablation, "measured_seconds_per_token", measured_seconds_per_token)
    grid = write_grid(tmp_path, RUNS)
    sweep = ablation.load_grid(grid)
    sweep_dir = tmp_path / "sweeps" / "tiny"
    finished = RunDir(sweep_dir / "sigma_moe-s0")
    finished.path.mkdir(parents=True)
    finished.summary.write_text(json.dumps({"wall_time_s": 600.0, "tokens_seen": 1000}))
    finished.write_status("finished")
    ablation.estimate_seconds(sweep, sweep_dir)
    seconds = {run.dir_name: run.estimated_s for run in sweep.runs}
    c = sweep.runs[0].config
    tokens = c.train.max_steps * c.data.batch_size * c.data.seq_len
    assert seconds["sigma_moe-s0"] == 600.0 and seconds["sigma_moe-s1"] == pytest.approx(0.6 * tokens)
    assert seconds["dense-s0"] == seconds["dense-s1"] > 1e-3 * tokens  # measured: training and validation
    assert measured == ["dense"]  # the cheapest model, timed; σ-MoE's time comes from its finished seed
    code, out, err = run_cli(["ablate", grid, "--dry-run", "--out", tmp_path / "sweeps"], capsys)
    assert code == 0, err
    left = next(line for line in out.splitlines() if line.startswith("│ left"))
    assert "3 runs" in left and "a finished run: the time it took" in " ".join(out.split())


@pytest.mark.parametrize("content, message", [
    ("runs: [\n", "Grid file '{grid}' is not valid YAML"),
    ("model: {d_model: 64}\n", "is an experiment, not a grid: train it with sffn train -c"),
])
def test_grid_file_mistakes_are_named_as_such(tmp_path, capsys, content, message):
    grid = tmp_path / "g.yaml"
    grid.write_text(content)
    code, _, err = run_cli(["ablate", grid], capsys)
    assert code == 2 and message.format(grid=grid) in " ".join(err.split()) and "Traceback" not in err


def test_ablate_on_the_default_experiment_points_to_train(capsys):
    code, _, err = run_cli(["ablate", "default"], capsys)
    assert code == 2 and "sffn train -c" in err and "unknown keys" not in err
