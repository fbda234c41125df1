"""The trackers users already have, against the real libraries and offline: W&B in offline mode and MLflow with a
file store receive a run's metrics, hyperparameters and usage statistics (W&B the expert-load histograms too), and
a run stopped by Ctrl-C and resumed in a new tracker session continues the same W&B run id / MLflow run. Each
test reads back what the library stored and compares it with the run's metrics.csv."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sffn_lab import training
from tests.histories import csv_history, wandb_offline_history
from tests.support import TINY, as_flags, interrupt_training_at, run_cli

MOE = [*TINY, "model.ffn.kind=sigma_moe", "model.ffn.n_experts=4", "model.ffn.expert_size=16"]


def interrupted_then_resumed(tmp_path, capsys, monkeypatch, tracker: str, end_session) -> Path:
    """A 25-step σ-MoE run logging to ``tracker`` too, stopped by Ctrl-C after step 13 and resumed after
    ``end_session()`` (what the end of the interrupted process does to the tracker's session)."""
    build = interrupt_training_at(monkeypatch, 13)
    args = ["train", *as_flags([*MOE, f"train.loggers=csv,{tracker}"]), "--max-steps", "25", "--out", tmp_path / "runs"]
    code, _, err = run_cli([*args, "--no-progress"], capsys)
    assert code == 130, err
    end_session()
    monkeypatch.setattr(training, "build_trainer", build)
    run_dir = next((tmp_path / "runs").iterdir())
    code, _, err = run_cli(["train", "--resume", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    end_session()
    return run_dir


def csv_values(run_dir: Path, key: str) -> dict[int, float]:
    return {int(row["step"]): float(row[key]) for row in csv_history(run_dir) if key in row}


def offline_wandb(tmp_path, monkeypatch):
    """wandb in offline mode, its settings and caches under ``tmp_path``."""
    wandb = pytest.importorskip("wandb", reason="the test extra installs wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "config",
                        "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))
    return wandb


def test_wandb_offline_run_gets_metrics_config_histograms_and_is_continued_on_resume(tmp_path, capsys, monkeypatch):
    wandb = offline_wandb(tmp_path, monkeypatch)

    def end_process_session():  # what a process's exit does: finish the run, stop wandb's service (which flushes)
        wandb.finish()
        wandb.teardown()

    run_dir = interrupted_then_resumed(tmp_path, capsys, monkeypatch, "wandb", end_process_session)

    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(folder.name.endswith(f"-{run_id}") for folder in segments)
    rows = []
    for folder in segments:
        stored_id, config, history = wandb_offline_history(folder)
        assert stored_id == run_id  # the resumed session writes to the same run
        assert config["config"]["model"]["ffn"]["kind"] == "sigma_moe" and config["corpus"]["vocab_size"] == 32
        rows += history
    for key in ("train/loss", "train_usage/layer0/entropy", "val/loss", "val_usage/layer0/dead_fraction"):
        logged = [(row["trainer/global_step"], row[key]) for row in rows if key in row]
        assert len({step for step, _ in logged}) == len(logged)  # no step logged twice across the two sessions
        assert dict(logged) == pytest.approx(csv_values(run_dir, key), rel=1e-7), key
    histograms = [row for row in rows if row.get("train_usage/layer0/load/_type") == "histogram"]
    assert histograms and all(sum(row["train_usage/layer0/load/values"]) == 4 for row in histograms)  # 4 experts
    assert any(row.get("val_usage/layer0/load/_type") == "histogram" for row in rows)


def test_runs_trained_one_after_another_in_a_process_get_their_own_wandb_runs(tmp_path, capsys, monkeypatch):
    """As `sffn ablate` trains a grid's runs: without finishing the earlier W&B run, WandbLogger would reuse it."""
    wandb = offline_wandb(tmp_path, monkeypatch)
    for seed in (0, 1):
        args = ["train", *as_flags([*MOE, "train.loggers=csv,wandb"]), "--max-steps", "5", "--seed", seed]
        assert run_cli([*args, "--out", tmp_path / "runs", "--no-progress"], capsys)[0] == 0
    wandb.finish()
    wandb.teardown()
    for run_dir in (tmp_path / "runs").iterdir():
        run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
        stored_id, _, rows = wandb_offline_history(next((run_dir / "wandb").glob("offline-run-*")))
        assert stored_id == run_id
        assert {row["trainer/global_step"]: row["train/loss"] for row in rows if "train/loss" in row} == pytest.approx(
            csv_values(run_dir, "train/loss"), rel=1e-7)


def test_mlflow_file_store_gets_metrics_and_params_and_the_resume_continues_its_run(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow", reason="the test extra installs mlflow-skinny")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file store in the run directory
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run_dir = interrupted_then_resumed(tmp_path, capsys, monkeypatch, "mlflow", lambda: None)

    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"file:{run_dir / 'mlruns'}")
    runs = client.search_runs([client.get_experiment_by_name("sffn-lab").experiment_id])
    assert [run.info.run_id for run in runs] == [run_id]  # one run, continued
    params = runs[0].data.params
    assert params["config/model/ffn/kind"] == "sigma_moe" and params["corpus/vocab_size"] == "32"
    for key in ("train/loss", "train_usage/layer0/entropy", "val/loss", "val_usage/layer0/dead_fraction"):
        history = client.get_metric_history(run_id, key)
        assert len({m.step for m in history}) == len(history)
        assert {m.step: m.value for m in history} == pytest.approx(csv_values(run_dir, key), rel=1e-7), key
    assert max(m.step for m in client.get_metric_history(run_id, "train/loss")) > 13  # the resumed segment


def test_an_unusable_mlflow_tracking_uri_is_refused_before_training(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow", reason="the test extra installs mlflow-skinny")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    args = ["train", *as_flags([*TINY, "train.loggers=csv,mlflow"]), "--max-steps", "2", "--out", tmp_path / "runs"]
    code, _, err = run_cli([*args, "--no-progress"], capsys)
    assert code == 2 and "MLflow cannot log to 'bogus://nowhere'" in err and "Traceback" not in err
    assert not any((tmp_path / "runs").iterdir())  # the run directory it had created is removed again


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_tracker_package_names_its_extra(tmp_path, capsys, monkeypatch, tracker):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else find_spec(name, *a))
    args = ["train", *as_flags([*TINY, f"train.loggers=csv,{tracker}"]), "--out", tmp_path / "runs", "--no-progress"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and f"pip install 'sffn-lab[{tracker}]'" in err and not (tmp_path / "runs").exists()
