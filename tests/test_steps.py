"""One step convention everywhere (steps completed: step 10 is the model after 10 optimizer steps), a resumed
run's new length kept in its config, a finished run said to be finished, and a run that can be followed
while it trains (its directory printed first, the latest validation in the live bar)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import yaml

from sffn_lab.callbacks import StepProgressBar
from tests.histories import csv_history, tensorboard_history
from tests.support import TINY, as_flags, run_cli


def train(tmp_path: Path, capsys, *extra) -> tuple[str, Path]:
    code, out, err = run_cli(["train", *as_flags(TINY), "--out", tmp_path / "runs", *extra], capsys)
    assert code == 0, err
    return out, next((tmp_path / "runs").iterdir())


def logged_steps(run_dir: Path, column: str) -> list[int]:
    return [int(row["step"]) for row in csv_history(run_dir) if column in row]


def test_console_checkpoints_metrics_and_tensorboard_count_the_same_steps(tmp_path, capsys):
    out, run_dir = train(tmp_path, capsys, "--max-steps", "20")  # train.log_every=5, train.val_every=10
    lines = out.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("run directory: "))) < lines.index(
        next(x for x in lines if x.startswith("step ")))  # the directory comes first, so it can be followed
    assert f"run directory: {run_dir}" in out
    assert [x.split()[1] for x in lines if x.startswith("step ") and "  loss " in x] == ["5/20", "10/20", "15/20",
                                                                                         "20/20"]
    assert [x.split()[1] for x in lines if x.startswith("step ") and "val/loss" in x] == ["10/20", "20/20"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-20.ckpt", "last.ckpt"]
    assert logged_steps(run_dir, "train/loss") == [5, 10, 15, 20]
    assert logged_steps(run_dir, "val/loss") == [10, 20]
    tensorboard = tensorboard_history(run_dir)
    assert [step for step, _ in tensorboard["train/loss"]] == [5, 10, 15, 20]
    assert [step for step, _ in tensorboard["val/loss"]] == [10, 20]


def test_resume_longer_is_recorded_and_a_finished_run_says_so(tmp_path, capsys):
    _, run_dir = train(tmp_path, capsys, "--max-steps", "10", "--no-progress")
    code, out, err = run_cli(["train", "--resume", run_dir, "--max-steps", "20"], capsys)
    assert code == 0, err
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 20
    assert logged_steps(run_dir, "train/loss") == [5, 10, 15, 20] and logged_steps(run_dir, "val/loss") == [10, 20]
    assert [x.split()[1] for x in out.splitlines() if x.startswith("step ") and "val/loss" in x] == ["20/20"]

    summary = (run_dir / "summary.json").read_text()
    code, out, err = run_cli(["train", "--resume", run_dir], capsys)
    assert code == 0, err
    assert "already finished: 20 of train.max_steps 20 steps done, nothing to train" in " ".join(out.split())
    assert "--max-steps N (N > 20)" in out and "validation loss" in out  # and its summary
    assert "step 20/" not in out and (run_dir / "summary.json").read_text() == summary  # nothing re-run


def test_the_live_bar_shows_the_latest_validation_with_its_step():
    bar = StepProgressBar()
    trainer = SimpleNamespace(loggers=[], progress_bar_metrics={"train/loss": 3.1}, sanity_checking=False,
                              global_step=250, callback_metrics={"val/loss": 2.71828},
                              state=SimpleNamespace(fn="fit"))
    assert "val/loss" not in bar.get_metrics(trainer, None)
    bar.on_validation_end(trainer, None)
    assert bar.get_metrics(trainer, None) == {"train/loss": 3.1, "val/loss": "2.7183 (step 250)"}
    assert json.dumps(bar.get_metrics(trainer, None))
