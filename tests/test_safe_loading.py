"""Nothing a user opens runs code: every command that reads a checkpoint refuses one that asks the unpickler for
a global beyond torch's weights-only allow-list, names the file and the global, exits 2 and runs nothing; the
checkpoints of the previous release still load, evaluate and resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sffn_lab import training
from sffn_lab.checkpoints import SafeCheckpointIO, read_checkpoint
from sffn_lab.config import load_config
from sffn_lab.errors import UserError
from sffn_lab.experiments import DEFAULT_CONFIG
from tests.support import TINY, run_cli
from tests.test_compare import write_runs

RELEASE_RUN = Path(__file__).parent / "data" / "release-0.1.0-run"


class Evil:
    """Pickled as a call of ``os.system``: the file of the issue, which ran its command under weights_only=False."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_evil(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"config": {}}, "x": Evil(f"touch {marker}")}, path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "runs"
    config = load_config(DEFAULT_CONFIG, [*TINY, "train.max_steps=5", f"train.out_dir={out}"])
    return Path(training.train(config, progress=False).run_dir)


# Each builds the arguments of one command that opens a checkpoint, and the checkpoint it will open.
def evil_eval(tmp_path, marker, tiny_run):
    evil = write_evil(tmp_path / "evil.ckpt", marker)
    return ["eval", evil], evil


def evil_sample(tmp_path, marker, tiny_run):
    evil = write_evil(tmp_path / "evil.ckpt", marker)
    return ["sample", evil, "--tokens", "5"], evil


def evil_eval_of_a_run_dir(tmp_path, marker, tiny_run):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        write_evil(ckpt, marker)
    return ["eval", run], next((run / "checkpoints").glob("best-*.ckpt"))


def evil_resume(tmp_path, marker, tiny_run):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    evil = write_evil(run / "checkpoints" / "last.ckpt", marker)
    return ["train", "--resume", run, "--no-progress"], evil


def evil_ablate_resume(tmp_path, marker, tiny_run):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "tiny", "set": [*TINY, "train.max_steps=4"], "seeds": [0],
                                    "runs": [{"name": "dense", "set": ["model.ffn.kind=dense"]}]}))
    evil = write_evil(tmp_path / "sweeps" / "tiny" / "dense-s0" / "checkpoints" / "last.ckpt", marker)  # to resume
    return ["ablate", grid, "--out", tmp_path / "sweeps"], evil


def evil_export(tmp_path, marker, tiny_run):
    evil = write_evil(tmp_path / "evil.ckpt", marker)
    return ["export", evil, "--out", tmp_path / "export"], evil


@pytest.mark.parametrize("command", [evil_eval, evil_sample, evil_eval_of_a_run_dir, evil_resume, evil_ablate_resume,
                                     evil_export])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys, tiny_run, command):
    marker = tmp_path / "MARKER"
    args, evil = command(tmp_path, marker, tiny_run)
    code, _, err = run_cli(args, capsys)
    assert not marker.exists()  # the command in the file never ran
    assert code == 2, err
    assert f"Checkpoint '{evil}' was refused: it asks to load posix.system" in err
    assert "Nothing in it was loaded or run" in err and "Traceback" not in err


def test_report_reads_no_checkpoint_of_the_sweep(tmp_path, capsys):
    """`sffn report` opens only summaries and metrics: a sweep whose checkpoints would run code reports as usual."""
    sweep = tmp_path / "sweep"
    write_runs(sweep, "ref", {0: 2.0, 1: 2.1}, baseline="ref")
    write_runs(sweep, "other", {0: 2.2, 1: 2.3})
    marker = tmp_path / "MARKER"
    for run in sweep.iterdir():
        if run.is_dir():
            write_evil(run / "checkpoints" / "last.ckpt", marker)
            write_evil(run / "checkpoints" / "best-20.ckpt", marker)
    code, out, err = run_cli(["report", sweep], capsys)
    assert code == 0, err
    assert "other" in out and not marker.exists()


def test_lightning_resume_reads_through_the_safe_reader(tmp_path, tiny_run):
    """A resume's ``trainer.fit(ckpt_path=...)`` loads with the run's SafeCheckpointIO, which refuses the file
    even when Lightning asks for ``weights_only=False``."""
    config = load_config(tiny_run / "config.yaml")
    trainer = training.build_trainer(config, tmp_path, progress=False)
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
    marker = tmp_path / "MARKER"
    with pytest.raises(UserError, match=r"posix\.system"):
        trainer.strategy.load_checkpoint(write_evil(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert not marker.exists()
    loaded = trainer.strategy.load_checkpoint(tiny_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert loaded["global_step"] == 5


def test_a_legacy_format_file_is_refused_as_unreadable_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"x": Evil(f"touch {marker}")}, legacy, _use_new_zipfile_serialization=False)
    code, _, err = run_cli(["eval", legacy], capsys)
    assert code == 2 and "not a valid sffn-lab checkpoint" in err and not marker.exists()


def test_a_checkpoint_holds_nothing_beyond_torchs_allow_list(tiny_run):
    for ckpt in (tiny_run / "checkpoints").glob("*.ckpt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []
        assert read_checkpoint(ckpt)["global_step"] == 5


def test_a_checkpoint_of_the_previous_release_evaluates_and_resumes(tmp_path, capsys):
    """``tests/data/release-0.1.0-run`` was written by sffn-lab 0.1.0 (commit 87d78c2, which loaded with
    weights_only=False): a 6-step σ-MoE run, whose ``sffn eval`` there gave loss 3.467557907104492 on the
    synthetic validation split. Under weights_only=True it gives the same loss, and resumes to step 8."""
    run = Path(shutil.copytree(RELEASE_RUN, tmp_path / "run"))
    code, out, err = run_cli(["eval", run / "checkpoints" / "last.ckpt", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(3.467557907104492, rel=1e-6)
    code, out, err = run_cli(["train", "--resume", run, "--max-steps", "8", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["step"] == 8
