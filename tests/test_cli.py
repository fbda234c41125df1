"""End to end through the ``sffn`` command: train, eval, sample, plot, resume, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest

from sffn_lab import training
from sffn_lab.durations import format_duration
from sffn_lab.run_dir import RunDir
from tests.histories import csv_history, tensorboard_history
from tests.support import TINY as TINY_OVERRIDES
from tests.support import add_to_every_trainer, as_flags, interrupt_training_at, run_cli

TINY = as_flags(TINY_OVERRIDES)


def train_tiny(tmp_path, capsys, *extra) -> Path:
    code, _, err = run_cli(["train", *TINY, "--out", tmp_path / "runs", "--no-progress", *extra], capsys)
    assert code == 0, err
    return Path(json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())["run_dir"])


def test_train_eval_sample_plot(tmp_path, capsys):
    code, out, err = run_cli(["train", *TINY, "--max-steps", "20", "--out", tmp_path / "runs", "--no-progress"], capsys)
    assert code == 0, err
    assert "gap to the entropy rate" in out and "tokens seen" in out
    run_dir = next((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 20 and summary["status"] == "finished"
    assert summary["tokens_seen"] == 20 * 8 * 32
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"

    # eval over the whole validation split reproduces the final validation loss of training
    code, out, err = run_cli(["eval", run_dir / "checkpoints" / "last.ckpt", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == 3000 - 1  # every validation token but the first is a scored target
    assert result["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    code, out, err = run_cli(["eval", run_dir, "--split", "test", "--json"], capsys)
    assert code == 0 and json.loads(out)["split"] == "test"

    code, out, err = run_cli(["sample", run_dir, "--tokens", "15", "--prompt", "", "--top-k", "5"], capsys)
    assert code == 0, err
    assert len(out.rstrip("\n")) == 16  # the start token and 15 generated ones, one character each

    png = tmp_path / "curve.png"
    code, out, err = run_cli(["plot", run_dir, run_dir, "--x", "tokens", "-o", png], capsys)
    assert code == 0, err
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.std() > 0.05


class ReadStatus(L.Callback):
    """Reads the run's status.json at the start of every step, with the last validation loss Lightning holds."""

    def __init__(self):
        self.seen: list[tuple[int, dict, float | None]] = []

    def on_train_batch_start(self, trainer, *args):
        val = trainer.callback_metrics.get("val/loss")
        status = RunDir(trainer.default_root_dir).read_status()
        self.seen.append((trainer.global_step, status, None if val is None else float(val)))


def test_status_json_tells_step_tokens_loss_and_eta_during_the_run(tmp_path, capsys, monkeypatch):
    reader = ReadStatus()
    add_to_every_trainer(monkeypatch, reader)
    train_tiny(tmp_path, capsys, "--max-steps", "25", "--set", "train.checkpoint_every=5")

    for step, status, val_loss in reader.seen:
        assert status["status"] == "running"
        written = step // 5 * 5  # validations at 10 and 20, checkpoints every 5 steps
        assert status["step"] == written
        if written == 0:
            assert status == {"status": "running", "step": 0}
            continue
        assert status["max_steps"] == 25 and status["tokens_seen"] == written * 8 * 32
        assert status["elapsed_s"] > 0 and status["eta_s"] >= 0
        if step >= 10:  # a validation has run: its loss is the one Lightning holds
            assert status["val_loss"] == pytest.approx(val_loss, rel=1e-6) and "val_bits" in status
        else:
            assert "val_loss" not in status
    assert len({json.dumps(status, sort_keys=True) for _, status, _ in reader.seen}) == 5  # steps 0, 5, 10, 15, 20


def test_same_seed_gives_the_same_curve(tmp_path, capsys):
    a = train_tiny(tmp_path / "a", capsys, "--max-steps", "12")
    b = train_tiny(tmp_path / "b", capsys, "--max-steps", "12")
    summary = [json.loads((d / "summary.json").read_text()) for d in (a, b)]
    assert summary[0]["val_loss"] == summary[1]["val_loss"]
    assert csv_history(a) == csv_history(b)


def test_ctrl_c_saves_and_resume_equals_uninterrupted(tmp_path, capsys, monkeypatch):
    full = train_tiny(tmp_path / "full", capsys, "--max-steps", "25")
    build = interrupt_training_at(monkeypatch, 13)
    code, _, err = run_cli(["train", *TINY, "--max-steps", "25", "--out", tmp_path / "part", "--no-progress"], capsys)
    assert code == 130 and "Interrupted at step 14" in err
    part = next((tmp_path / "part").iterdir())
    assert json.loads((part / "status.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(training, "build_trainer", build)

    code, _, err = run_cli(["train", "--resume", part, "--no-progress"], capsys)
    assert code == 0, err
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    assert a["val_loss"] == b["val_loss"]  # bitwise: same data, same dropout masks, same optimizer state
    assert a["tokens_seen"] == b["tokens_seen"]
    assert csv_history(part) == csv_history(full)  # every metric of every step, none lost or repeated
    assert tensorboard_history(part) == tensorboard_history(full)


def test_resume_with_a_changed_config_is_refused(tmp_path, capsys):
    run_dir = train_tiny(tmp_path, capsys, "--max-steps", "5")
    code, _, err = run_cli(["train", "--resume", run_dir, "--set", "model.d_model=64"], capsys)
    assert code == 2 and "different config" in err and "model.d_model" in err


def test_eval_of_a_checkpoint_on_a_mismatched_model_is_refused(tmp_path, capsys):
    run_dir = train_tiny(tmp_path, capsys, "--max-steps", "5")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    import torch

    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["config"]["model"]["d_model"] = 64
    torch.save(state, tmp_path / "other.ckpt")
    code, _, err = run_cli(["eval", tmp_path / "other.ckpt"], capsys)
    assert code == 2 and "does not match" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--set", "model.d_modle=8"], "Did you mean 'model.d_model'"),
        (["train", "--set", "train.lr=fast"], "expects a float"),
        (["train", "--set", "model.ffn.kind=sigma_moa"], "model.ffn.kind"),
        (["train", "--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
        (["train", "--config", "{bad_yaml}"], "not valid YAML"),
        (["train", "--config", "/nonexistent.yaml"], "does not exist"),
        (["eval", "/nonexistent.ckpt"], "does not exist"),
        (["eval", "{garbage_ckpt}"], "not a valid sffn-lab checkpoint"),
        (["train", "--resume", "/nonexistent_run"], "not a run directory"),
    ],
)
def test_bad_input_gives_a_short_error_and_exit_2(tmp_path, capsys, args, message):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {d_model: [\n")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(100))
    args = [a.format(bad_yaml=bad_yaml, garbage_ckpt=garbage) for a in args]
    code, _, err = run_cli([*args, "--out", tmp_path / "runs"] if args[0] == "train" else args, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_nan_loss_stops_with_the_step_and_last_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(
        ["train", *TINY, "--max-steps", "30", "--set", "train.lr=1e30", "--set", "train.warmup_steps=0",
         "--set", "train.checkpoint_every=1", "--out", tmp_path / "runs", "--no-progress"],
        capsys,
    )
    assert code == 2 and "became nan" in err.lower() and "at step" in err and "last.ckpt" in err
    run_dir = next((tmp_path / "runs").iterdir())
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


def test_skip_nonfinite_skips_a_poisoned_batch_and_counts_it(tmp_path, capsys, monkeypatch):
    import torch

    from sffn_lab import lm_module

    calls = {"n": 0}
    real = lm_module.token_losses

    def poisoned(logits, targets, mask):
        losses, scored = real(logits, targets, mask)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:
                losses = losses * float("nan")
        return losses, scored

    monkeypatch.setattr(lm_module, "token_losses", poisoned)
    run_dir = train_tiny(tmp_path, capsys, "--max-steps", "8", "--set", "train.skip_nonfinite=true")
    import csv

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert max(float(r["train/nonfinite_skips"]) for r in rows if r.get("train/nonfinite_skips")) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 8 and summary["val_loss"] == summary["val_loss"]  # finished, finite


def test_sigma_moe_run_logs_expert_usage_and_draws_the_heatmap(tmp_path, capsys):
    run_dir = train_tiny(tmp_path, capsys, "--max-steps", "10", "--set", "model.ffn.kind=sigma_moe",
                         "--set", "model.ffn.n_experts=4", "--set", "model.ffn.expert_size=16",
                         "--set", "model.ffn.sigma_moe.entropy_coef=0.01")
    import csv

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    columns = set(rows[0])
    for stage in ("train", "val"):
        for stat in ("entropy", "perplexity", "dead_fraction", "max_load"):
            assert f"{stage}_usage/layer0/{stat}" in columns
    perplexity = [float(r["val_usage/layer0/perplexity"]) for r in rows if r.get("val_usage/layer0/perplexity")]
    assert perplexity and all(0.25 <= p <= 1.0 for p in perplexity)
    assert any(float(r["train/aux_loss"]) < 0 for r in rows if r.get("train/aux_loss"))  # −entropy, weighted
    assert (run_dir / "expert_usage.png").stat().st_size > 5000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["active_params"] < summary["total_params"]


def test_batch_jobs_get_one_plain_progress_line_every_log_every_steps(tmp_path, capsys):
    """With standard output not a terminal (here: captured), progress is plain lines, not a rich bar."""
    code, out, err = run_cli(["train", *TINY, "--max-steps", "20", "--out", tmp_path / "runs"], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    train_lines = [line for line in lines if "  loss " in line]
    assert [line.split()[1] for line in train_lines] == ["5/20", "10/20", "15/20", "20/20"]  # train.log_every=5
    assert all("tok/s" in line and "elapsed" in line and "ETA" in line for line in train_lines[1:])
    assert [line.split()[1] for line in lines if "val/loss" in line] == ["10/20", "20/20"]  # train.val_every=10
    assert "━" not in out  # no progress bar drawing


@pytest.mark.parametrize("seconds, text", [
    (4.24, "4.2 s"), (42.4, "42 s"), (65, "1 min 5 s"), (3725, "1 h 2 min"), (7040, "1 h 57 min"), (7199, "2 h"),
    (7.05e6, "81 d 14 h"), (float("nan"), "?"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_sample_uses_the_run_directorys_tokenizer_and_names_unencodable_characters(tmp_path, capsys):
    corpus = tmp_path / "words.txt"
    corpus.write_text("the cat sat on the mat\nthe dog sat on the log\n" * 400)
    run_dir = train_tiny(tmp_path, capsys, "--max-steps", "3", "--data", str(corpus))
    assert json.loads((run_dir / "tokenizer.json").read_text())["kind"] == "byte"
    corpus.unlink()  # sampling must not need the corpus any more
    code, out, err = run_cli(["sample", run_dir, "--prompt", "the cat", "--tokens", "5"], capsys)
    assert code == 0 and out.startswith("the cat"), err

    synthetic = train_tiny(tmp_path / "synthetic", capsys, "--max-steps", "3")
    code, out, err = run_cli(["sample", synthetic, "--prompt", "hello world", "--tokens", "5"], capsys)
    assert code == 2 and "cannot be encoded" in err and "'h'" in err and "' '" in err and "Traceback" not in err
