"""Crash safety and scale-out with real processes: SIGKILL mid-training, DDP on two CPU processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sffn_lab import training
from sffn_lab.cli import DEFAULT_CONFIG
from sffn_lab.config import load_config

TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.ffn.d_ff=64", "data.seq_len=32",
    "data.batch_size=8", "data.eval_batch_size=64", "data.synthetic.train_tokens=40000",
    "data.synthetic.valid_tokens=3000", "data.synthetic.test_tokens=2000", "train.val_every=10",
    "train.log_every=5", "train.warmup_steps=5", "model.dropout=0.1", "train.checkpoint_every=7",
]


def sffn(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "sffn_lab", *map(str, args)], env=env, **kwargs)


def overrides_as_flags(overrides: list[str]) -> list[str]:
    return [flag for o in overrides for flag in ("--set", o)]


def test_sigkill_then_resume_ends_with_the_same_metrics(tmp_path):
    full = training.train(
        load_config(DEFAULT_CONFIG, [*TINY, "train.max_steps=400", f"train.out_dir={tmp_path / 'full'}"]),
        progress=False,
    )

    proc = sffn(["train", *overrides_as_flags(TINY), "--max-steps", "400", "--out", tmp_path / "killed", "--no-progress"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    last = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed").glob("*/checkpoints/last.ckpt"))
        if found and found[0].stat().st_size > 0:
            last = found[0]
            time.sleep(0.3)  # let training go on past the first checkpoint
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = last.parents[1]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    assert not (run_dir / "summary.json").exists()

    resumed = sffn(["train", "--resume", run_dir, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 400
    assert summary["val_loss"] == full.val_loss  # bitwise on the CPU
    assert summary["tokens_seen"] == full.tokens_seen


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    base = [*TINY, "model.dropout=0.0", "train.max_steps=12", "train.log_every=1", "train.accelerator=cpu"]
    single = training.train(load_config(DEFAULT_CONFIG, [*base, f"train.out_dir={tmp_path / 'one'}"]), progress=False)

    proc = sffn(["train", *overrides_as_flags(base), "--devices", "2", "--strategy", "ddp", "--out", tmp_path / "two",
                 "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    run_dirs = list((tmp_path / "two").iterdir())
    assert len(run_dirs) == 1, "both ranks must write into one run directory"

    def train_losses(run_dir: Path) -> dict[int, float]:
        rows = csv.DictReader((Path(run_dir) / "metrics.csv").open())
        return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}

    one, two = train_losses(single.run_dir), train_losses(run_dirs[0])
    assert one.keys() == two.keys() and len(one) >= 10
    for step in one:  # same global batch, gradients averaged over ranks: equal up to float summation order
        assert two[step] == pytest.approx(one[step], abs=2e-4), step
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(single.val_loss, abs=2e-4)
    assert summary["tokens_seen"] == single.tokens_seen
