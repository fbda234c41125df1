"""Crash safety, scale-out and bad input: real processes, real kills, two gloo ranks, simulated disk-full."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from sffn_lab import training
from sffn_lab.checkpoints import read_checkpoint
from sffn_lab.cli import DEFAULT_CONFIG
from sffn_lab.config import load_config
from sffn_lab.data import corpora
from sffn_lab.data.corpora import CorpusSpec, RemoteFile
from sffn_lab.kernels import triton_available
from tests.gloo_ranks import AUX_ROUTERS, aux_loss_rank, router_aux_and_grad
from tests.histories import csv_history, tensorboard_history
from tests.support import TINY as SHARED_TINY
from tests.support import add_to_every_trainer, as_flags, host_reads_are_errors, run_cli

TINY = [*SHARED_TINY, "train.checkpoint_every=7"]
SIGMA_MOE = ["model.ffn.kind=sigma_moe", "model.ffn.n_experts=4", "model.ffn.expert_size=16",
             "model.ffn.top_k=2", "model.ffn.sigma_moe.entropy_coef=0.01"]


def sffn(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "sffn_lab", *map(str, args)], env=env, **kwargs)


def logged(run_dir: Path | str) -> dict[str, dict[int, float]]:
    """metrics.csv → column → step → value (the non-empty cells)."""
    table: dict[str, dict[int, float]] = {}
    for row in csv.DictReader((Path(run_dir) / "metrics.csv").open()):
        for column, value in row.items():
            if value and column != "step":
                table.setdefault(column, {})[int(row["step"])] = float(value)
    return table


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` → sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- crash safety


def test_sigkill_then_resume_ends_with_the_same_metrics(tmp_path):
    overrides = [*TINY, "train.max_steps=60"]
    full = training.train(load_config(DEFAULT_CONFIG, [*overrides, f"train.out_dir={tmp_path / 'full'}"]),
                          progress=False)

    run_dir = killed_while_saving(3, ["train", *as_flags(overrides), "--out", tmp_path / "killed", "--no-progress"],
                                  tmp_path / "killed")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    assert not (run_dir / "summary.json").exists()
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 14  # the 2nd save's, intact

    resumed = sffn(["train", "--resume", run_dir, "--no-progress"],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 60
    assert summary["val_loss"] == full.val_loss  # bitwise on the CPU
    assert summary["tokens_seen"] == full.tokens_seen
    # the whole logged history, with no row lost before the kill and none repeated after the resume
    assert csv_history(run_dir) == csv_history(full.run_dir)
    assert tensorboard_history(run_dir) == tensorboard_history(full.run_dir)
    assert summary["wall_time_s"] > read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["sffn"][
        "wall_time_s"] * 0.5  # covers the first segment too


def test_disk_full_while_saving_stops_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    real_save = torch.save
    saves = {"n": 0}

    def save_until_the_disk_is_full(obj, file, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] >= 2:
            file.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    args = ["train", *as_flags([*TINY, "train.checkpoint_every=3", "train.val_every=100"]),
            "--max-steps", "9", "--out", tmp_path / "runs", "--no-progress"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "No space left on device" in err and "earlier checkpoints are intact" in err
    assert "stopped at step 6" in err and "Traceback" not in err
    run_dir = next((tmp_path / "runs").iterdir())
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 3
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run continues from step 3
    code, _, err = run_cli(["train", "--resume", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 9


# ------------------------------------------------------------------------------------------- scale-out


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_two_nodes_on_localhost_match_one_process(tmp_path):
    """Two "nodes" of one process each, started by hand as a launcher would (MASTER_ADDR, MASTER_PORT,
    NODE_RANK, WORLD_SIZE, LOCAL_RANK), sharing --run-dir: the same losses as one process, one run directory."""
    base = [*TINY, "model.dropout=0.0", "train.max_steps=8", "train.log_every=1", "train.val_every=4",
            "train.accelerator=cpu"]
    single = training.train(load_config(DEFAULT_CONFIG, [*base, f"train.out_dir={tmp_path / 'one'}"]),
                            progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "two" / "run"
    nodes = [sffn(["train", *as_flags(base), "--strategy", "ddp", "--devices", "1", "--num-nodes", "2",
                   "--run-dir", run_dir, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank),
                       "WORLD_SIZE": "2", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    for rank, node in enumerate(nodes):
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, f"node {rank}: {err.decode()[-3000:]}"
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["run"]
    one, two = logged(single.run_dir), logged(run_dir)
    assert one["train/loss"].keys() == two["train/loss"].keys() and len(one["train/loss"]) >= 7
    for step, loss in one["train/loss"].items():
        assert two["train/loss"][step] == pytest.approx(loss, abs=2e-4), step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens_seen"] == single.tokens_seen
    assert summary["val_loss"] == pytest.approx(single.val_loss, abs=2e-4)


def killed_while_saving(n: int, args: list, out: Path, env: dict | None = None) -> Path:
    """Run ``sffn ARGS`` killed (SIGKILL to its process group) while it saves its n-th last.ckpt, after the new
    file is written and before it is renamed into place (``tests/killed_run.py``); its run directory."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("killed_run.py")), *map(str, args)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "KILL_AT_SAVE": str(n), **(env or {})},
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    assert proc.wait(timeout=600) == -signal.SIGKILL, "the run ended before its checkpoint save was reached"
    (run_dir,) = {p.parents[1] for p in out.glob("*/checkpoints/*.ckpt")}
    assert list(run_dir.glob("checkpoints/.last.ckpt.tmp")), "killed after the temporary file was written"
    return run_dir


def ddp_killed_after_a_checkpoint(base: list[str], out: Path) -> Path:
    """Train ``base`` on 2 gloo DDP processes into ``out``, killed while saving its second last.ckpt (so one is
    complete); returns the run directory."""
    return killed_while_saving(2, ["train", *as_flags(base), "--devices", "2", "--strategy", "ddp", "--out", out,
                                   "--no-progress"], out, env={"OMP_NUM_THREADS": "1"})


def resume_on_one_process(run_dir: Path) -> None:
    resumed = sffn(["train", "--resume", run_dir, "--devices", "1", "--strategy", "auto", "--no-progress"],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_two_processes_killed_then_resumed_on_one_continue_exactly(tmp_path):
    """DDP on 2 processes, SIGKILL to the whole process group after a checkpoint, then --resume with
    --devices 1: the end equals one process trained without interruption (up to float summation order)."""
    base = [*TINY, "model.dropout=0.0", "train.max_steps=40", "train.val_every=10", "train.checkpoint_every=5",
            "train.accelerator=cpu"]
    single = training.train(load_config(DEFAULT_CONFIG, [*base, f"train.out_dir={tmp_path / 'one'}"]),
                            progress=False)
    run_dir = ddp_killed_after_a_checkpoint(base, tmp_path / "two")
    killed_at = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert killed_at == 5 and not (run_dir / "summary.json").exists()  # checkpoint_every=5: the 1st save's
    resume_on_one_process(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 40 and summary["tokens_seen"] == single.tokens_seen
    assert summary["val_loss"] == pytest.approx(single.val_loss, abs=2e-4)
    one, two = logged(single.run_dir), logged(run_dir)
    for step, loss in one["train/loss"].items():
        if step > killed_at:  # the resumed segment, on one process
            assert two["train/loss"][step] == pytest.approx(loss, abs=2e-4), step


def test_a_second_node_without_the_shared_run_dir_is_told_what_to_pass(tmp_path):
    proc = sffn(["train", *as_flags(TINY), "--max-steps", "2", "--num-nodes", "2", "--out", tmp_path],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"NODE_RANK": "1", "LOCAL_RANK": "0"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and b"--run-dir" in err and not any(tmp_path.iterdir())


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    """σ-MoE with its entropy regulariser: losses, aux loss and expert-usage statistics match one process."""
    base = [*TINY, *SIGMA_MOE, "model.dropout=0.0", "train.max_steps=12", "train.log_every=1",
            "train.accelerator=cpu"]
    single = training.train(load_config(DEFAULT_CONFIG, [*base, f"train.out_dir={tmp_path / 'one'}"]),
                            progress=False)

    proc = sffn(["train", *as_flags(base), "--devices", "2", "--strategy", "ddp",
                 "--out", tmp_path / "two", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    run_dirs = list((tmp_path / "two").iterdir())
    assert len(run_dirs) == 1, "both ranks must write into one run directory"

    one, two = logged(single.run_dir), logged(run_dirs[0])
    compared = [c for c in one
                if c.startswith(("train/loss", "train/aux_loss", "train_usage/", "val_usage/"))]
    assert len(compared) == 2 + 2 * 5, compared  # losses + 4 usage statistics and the mean gate, train and val
    for column in compared:
        assert one[column].keys() == two[column].keys(), column
        for step in one[column]:
            # Same global batch, gradients averaged over ranks, statistics reduced over ranks: equal up to
            # float summation order (the usage statistics are functions of integer counts).
            tolerance = 2e-4 if column.startswith("train/") else 1e-6
            assert two[column][step] == pytest.approx(one[column][step], abs=tolerance), (column, step)
    assert len(one["train/loss"]) >= 10 and len(one["val_usage/layer0/entropy"]) >= 2
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(single.val_loss, abs=2e-4)
    assert summary["tokens_seen"] == single.tokens_seen


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_auxiliary_losses_over_two_ranks_are_those_of_the_global_batch(tmp_path):
    """Each gloo rank sees half the tokens; its aux loss and the rank-mean gradient are the global batch's."""
    x = torch.randn(48, 16, dtype=torch.float64)
    # the second rank's half is offset, so that half a batch's statistics clearly differ from the global
    # batch's (over 1000 seeds the smallest relative difference of the half-batch aux loss was 6e-4)
    x[24:] += 3 * torch.randn(16, dtype=torch.float64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(aux_loss_rank, args=(2, port, x, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    # Switch's dispatch fractions f_i are formed in float32, hence 1e-6 rather than float64 round-off.
    for kind in AUX_ROUTERS:
        aux, grad = router_aux_and_grad(kind, x)
        for per_rank in ranks:
            assert per_rank[kind][0] == pytest.approx(aux, rel=1e-6), kind  # every rank: the global value
        ddp_grad = (ranks[0][kind][1] + ranks[1][kind][1]) / 2  # what DDP's gradient averaging applies
        assert (ddp_grad - grad).norm() <= 1e-6 * grad.norm(), kind
        half_batch_aux, _ = router_aux_and_grad(kind, x.chunk(2)[0])
        assert half_batch_aux != pytest.approx(aux, rel=1e-4), f"{kind}: half a batch must differ"


# ------------------------------------------------------------------------------------------- non-finite losses


def poison_batches(monkeypatch, calls: set[int]) -> None:
    """Make the training loss NaN on the given training_step calls (0-based)."""
    from sffn_lab import lm_module

    real, count = lm_module.token_losses, iter(range(10**9))

    def poisoned(logits, targets, mask):
        losses, scored = real(logits, targets, mask)
        if torch.is_grad_enabled() and next(count) in calls:
            losses = losses * float("nan")
        return losses, scored

    monkeypatch.setattr(lm_module, "token_losses", poisoned)


class StateAroundStep(L.Callback):
    """Copies of the parameters and the optimizer state before and after training step ``step``."""

    def __init__(self, step: int):
        self.step, self.copies = step, {}

    def _copy(self, trainer, module, when: str) -> None:
        optimizer = trainer.optimizers[0]
        state = [v.clone() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        self.copies[when] = [p.detach().clone() for p in module.parameters()] + state

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            self._copy(trainer, module, "before")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self._copy(trainer, module, "after")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_a_nonfinite_batch_leaves_parameters_and_optimizer_state_untouched(tmp_path, monkeypatch, precision):
    """With train.skip_nonfinite, a NaN batch's step is a no-op made on the device (the fused AdamW's found_inf):
    every parameter and every optimizer state tensor (moments, step counts) is bit-identical across it, the
    step before it changed them, and the batch is counted once."""
    poison_batches(monkeypatch, {3})
    probes = [StateAroundStep(2), StateAroundStep(3)]
    for probe in probes:
        add_to_every_trainer(monkeypatch, probe)
    config = load_config(DEFAULT_CONFIG, [*TINY, *SIGMA_MOE, "train.max_steps=6", "train.skip_nonfinite=true",
                                          f"train.precision={precision}", f"train.out_dir={tmp_path}"])
    summary = training.train(config, progress=False)
    trained, skipped = (probe.copies for probe in probes)
    assert not all(a.equal(b) for a, b in zip(trained["before"], trained["after"], strict=True))
    assert all(a.equal(b) for a, b in zip(skipped["before"], skipped["after"], strict=True))
    assert logged(summary.run_dir)["train/nonfinite_skips"] == {5: 1.0, 6: 1.0}  # log step 5 and the last, 6
    assert summary.tokens_seen == 5 * 8 * 32  # the skipped batch's tokens are not counted


def test_too_many_nonfinite_batches_in_a_row_stop_with_the_step_and_last_checkpoint(tmp_path, capsys, monkeypatch):
    """Skipping allows MAX_CONSECUTIVE_SKIPS batches in a row; the next one stops the run when the host next
    reads the records (a log step, here the row of step 25): the error names the batch's step and the last
    checkpoint, saved at step 21 with the parameters of step 2."""
    from sffn_lab.lm_module import MAX_CONSECUTIVE_SKIPS

    assert MAX_CONSECUTIVE_SKIPS == 20
    poison_batches(monkeypatch, set(range(2, 100)))
    code, _, err = run_cli(["train", *as_flags([*TINY, "train.skip_nonfinite=true"]), "--max-steps", "40",
                            "--out", tmp_path / "runs", "--no-progress"], capsys)
    assert code == 2, err
    assert "in 21 consecutive batches at step 23" in err and "last.ckpt" in err  # steps completed: the 23rd
    run_dir = next((tmp_path / "runs").iterdir())
    last = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 21 and last["sffn"]["nonfinite_skips"] == 19


@pytest.mark.skipif(not triton_available(), reason="no triton")
@pytest.mark.parametrize("kind", ["dense", "sigma_moe"])
def test_training_steps_read_nothing_from_the_device_between_log_steps(tmp_path, monkeypatch, kind):
    """With host reads made errors (the CPU stand-in for CUDA's sync debug mode), the LightningModule's
    training_step (all but the log steps, every 5th and the last), its backward, optimizer hook and gradient
    clipping run a whole training with a poisoned batch among them; the FFN layers on the Triton path (the PyTorch path
    reads expert counts on the host by design)."""
    from sffn_lab.lm_module import LanguageModelModule

    poison_batches(monkeypatch, {6})
    monkeypatch.setenv("SFFN_KERNEL", "triton")
    guarded: dict[str, int] = {}

    def refusing(name):
        real = getattr(LanguageModelModule, name)

        def hook(self, *args, **kwargs):
            if name == "training_step" and self.is_log_step():
                return real(self, *args, **kwargs)
            guarded[name] = guarded.get(name, 0) + 1
            with host_reads_are_errors():
                return real(self, *args, **kwargs)

        monkeypatch.setattr(LanguageModelModule, name, hook)

    for name in ("training_step", "backward", "on_before_optimizer_step", "configure_gradient_clipping"):
        refusing(name)
    ffn = SIGMA_MOE if kind == "sigma_moe" else []
    config = load_config(DEFAULT_CONFIG, [*TINY, *ffn, "train.max_steps=12", "train.skip_nonfinite=true",
                                          f"train.out_dir={tmp_path}"])
    summary = training.train(config, progress=False)
    assert guarded == {"training_step": 12 - 3, "backward": 12, "on_before_optimizer_step": 12,
                       "configure_gradient_clipping": 12}
    assert logged(summary.run_dir)["train/nonfinite_skips"][10] == 1.0


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    """A finished run with a best and a last checkpoint, which no bad input may change."""
    out = tmp_path_factory.mktemp("earlier") / "runs"
    config = load_config(DEFAULT_CONFIG, [*TINY, "train.max_steps=5", f"train.out_dir={out}"])
    return Path(training.train(config, progress=False).run_dir)


def copy_run(run_dir: Path, to: Path, damage: str) -> Path:
    """A copy of ``run_dir`` whose last.ckpt is cut short ("truncated") or from another model ("foreign")."""
    copy = Path(shutil.copytree(run_dir, to))
    last = copy / "checkpoints" / "last.ckpt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        foreign = torch.load(last, weights_only=True)
        foreign["hyper_parameters"]["config"]["model"]["ffn"]["d_ff"] = 32
        torch.save(foreign, last)
    return copy


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "{empty}"], "is empty"),
        (["train", "--data", "{binary}"], "binary file"),
        (["train", "--data", "{short}"], "fewer than one window"),
        (["train", "--data", "enwik9"], "Did you mean 'enwik8'"),
        (["train", "--set", "model.ffn.kind=sigma_moe", "--set", "model.ffn.n_experts=4",
          "--set", "model.ffn.top_k=5"], "cannot use more experts than exist"),
        (["train", "--set", "model.ffn.kind=pkm", "--set", "model.ffn.pkm.knn=99"], "model.ffn.pkm.knn"),
        (["train", "--out", "{a_file}/runs"], "Cannot create the output directory"),
        (["train", "--strategy", "nonsense"], "train.strategy=nonsense"),
        (["train", "--strategy", "fsdp", "--accelerator", "cpu"], "train.strategy=fsdp"),
        (["train", "--precision", "16-mixed", "--accelerator", "cpu"], "Lightning would run bf16-mixed instead"),
        (["train", "--set", "train.loggers=csv,neptune"], "Unknown logger(s) neptune"),
        (["train", "--set", "train.accumulate_grad_batches=0"], "accumulate_grad_batches must be at least 1"),
        (["eval", "{truncated_run}/checkpoints/last.ckpt"], "it is cut short or corrupt"),
        (["sample", "{truncated_run}/checkpoints/last.ckpt"], "it is cut short or corrupt"),
        (["train", "--resume", "{truncated_run}"], "it is cut short or corrupt"),
        (["train", "--resume", "{foreign_run}"], "different config (changed: model.ffn.d_ff)"),
    ],
)
def test_bad_input_gives_exit_2_and_leaves_earlier_runs_intact(tmp_path, capsys, earlier_run, args, message):
    files = {"empty": b"", "binary": b"\x00\x01\x02binary" * 100, "short": b"short text", "a_file": b"x"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    runs = {name: copy_run(earlier_run, tmp_path / name, name.split("_")[0])
            for name in ("truncated_run", "foreign_run") if f"{{{name}}}" in " ".join(args)}
    places = {**{name: tmp_path / name for name in files}, **runs}
    args = [a.format(**places) for a in args]
    if args[0] == "train" and "--resume" not in args:
        args = [*args, *as_flags(TINY), *([] if "--out" in args else ["--out", earlier_run.parent])]
    before = {run: snapshot(run) for run in [earlier_run.parent, *runs.values()]}

    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err) < 800
    assert {run: snapshot(run) for run in before} == before  # nothing written, nothing removed


def test_a_corrupt_token_cache_gives_exit_2_and_is_rebuilt_on_the_next_run(tmp_path, capsys, monkeypatch):
    source = tmp_path / "remote.txt"
    source.write_bytes(bytes(np.random.default_rng().choice(list(b"abcdefgh ij\n"), size=30_000).tolist()))
    spec = CorpusSpec("tinyshakespeare", "byte", RemoteFile(source.as_uri(), "input.txt"), {"*": "input.txt"})
    monkeypatch.setitem(corpora.REGISTRY, "tinyshakespeare", spec)
    cache = tmp_path / "cache"
    data = ["--data", "tinyshakespeare", "--set", f"data.cache_dir={cache}"]
    data_config = load_config(DEFAULT_CONFIG, ["data.corpus=tinyshakespeare", f"data.cache_dir={cache}"]).data
    corpora.load_corpus(data_config)
    (cached,) = (cache / "tinyshakespeare").glob("bytes.*.npy")
    for damage in (b"", cached.read_bytes()[:200]):  # empty, and cut short
        cached.write_bytes(damage)
        args = ["train", *data, *as_flags(TINY), "--out", tmp_path / "runs"]
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "were corrupt" in err and "Traceback" not in err
        assert not cached.exists() and not (tmp_path / "runs").exists()
    corpus = corpora.load_corpus(data_config)
    assert bytes(corpus.splits["train"][:100]) == source.read_bytes()[:100]


@pytest.mark.parametrize(
    "loadavg, expected_others", [("0.5 0.4 0.3 3/210 999\n", 2), ("2.0 2.0 2.0 1/210 999\n", None)]
)
def test_training_on_busy_cores_warns_and_still_trains(tmp_path, capsys, monkeypatch, loadavg, expected_others):
    """/proc/loadavg's runnable count includes the reader: 3 → two other processes; 1 → none, whatever
    the lagging load averages say."""
    from sffn_lab import busy_cpu

    fake = tmp_path / "loadavg"
    fake.write_text(loadavg)
    monkeypatch.setattr(busy_cpu, "LOADAVG", fake)
    monkeypatch.setattr(busy_cpu.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert busy_cpu.other_runnable_tasks(samples=2, interval_s=0) == (expected_others or 0)
    code, out, err = run_cli(["train", *as_flags(TINY), "--max-steps", "2", "--out", tmp_path / "runs",
                              "--no-progress"], capsys)
    assert code == 0, err
    if expected_others:
        assert f"warning: {expected_others} other process(es) are running on this machine's 2 cores" in out
    else:
        assert "other process(es)" not in out
    assert "validation" in out


def test_no_contention_check_where_proc_loadavg_is_missing(tmp_path, monkeypatch):
    from sffn_lab import busy_cpu

    monkeypatch.setattr(busy_cpu, "LOADAVG", tmp_path / "absent")
    assert busy_cpu.other_runnable_tasks() is None and busy_cpu.contention_warning(64) is None


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_memory_on_two_processes_killed_then_resumed_on_one_continues_the_streams(tmp_path):
    """Transformer-XL on 2 DDP processes, SIGKILL after a checkpoint, resumed on 1 process: every training loss
    of the resumed segment equals one process trained throughout. It needs the checkpoint's cache to hold both
    ranks' rows in global-batch order (each row continues its own stretch of text)."""
    base = [*TINY, "model.dropout=0.0", "model.positions=relative", "model.memory_segments=1", "data.batch_size=4",
            "train.max_steps=40", "train.val_every=10", "train.checkpoint_every=5", "train.log_every=1",
            "train.accelerator=cpu"]
    single = training.train(load_config(DEFAULT_CONFIG, [*base, f"train.out_dir={tmp_path / 'one'}"]),
                            progress=False)
    run_dir = ddp_killed_after_a_checkpoint(base, tmp_path / "two")
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    killed_at = checkpoint["global_step"]
    assert killed_at == 5  # checkpoint_every=5: the 1st save's
    assert [tuple(m.shape) for m in checkpoint["sffn"]["memory"]] == [(4, 32, 32)]  # 2 ranks × 2 rows, 1 segment
    resume_on_one_process(run_dir)
    one, two = logged(single.run_dir), logged(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] == pytest.approx(single.val_loss, abs=2e-4)
    for step, loss in one["train/loss"].items():
        if step >= killed_at:  # the resumed segment, on one process
            assert two["train/loss"][step] == pytest.approx(loss, abs=2e-4), step
