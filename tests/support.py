"""What several test modules share: the tiny training setting, running the ``sffn`` command in-process, and the
CPU stand-in for CUDA's sync debug mode."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch

from sffn_lab import training
from sffn_lab.cli import main

# A model and corpus small enough that a training step takes milliseconds; 3000 validation tokens.
TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.ffn.d_ff=64", "data.seq_len=32",
    "data.batch_size=8", "data.eval_batch_size=64", "data.synthetic.train_tokens=40000",
    "data.synthetic.valid_tokens=3000", "data.synthetic.test_tokens=2000", "train.val_every=10",
    "train.log_every=5", "train.warmup_steps=5", "model.dropout=0.1",
]


@contextmanager
def host_reads_are_errors(device=None) -> Iterator[None]:
    """A CPU stand-in for CUDA's sync debug mode: the tensor calls that read device values on the host raise.
    (``device`` is unused: the signature of ``gpu_check.host_syncs_are_errors``, which this replaces in tests.)"""
    names = ("nonzero", "item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def call(*args, **kwargs):
            raise RuntimeError(f"host read: Tensor.{name}")
        return call

    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def as_flags(overrides: list[str]) -> list[str]:
    """Dotted overrides → ``--set`` flags of the command line."""
    return [flag for o in overrides for flag in ("--set", o)]


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    """Run ``sffn ARGS`` in this process → (exit code, stdout, stderr)."""
    old_argv = sys.argv
    sys.argv = ["sffn", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
    out, err = capsys.readouterr()
    return code, out, err


class InterruptAtStep(L.Callback):
    """Sends this process a real SIGINT (Ctrl-C) when training reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def add_to_every_trainer(monkeypatch, callback: L.Callback):
    """Every trainer ``training.build_trainer`` builds from now on gets ``callback`` too; returns the unpatched
    ``build_trainer``, to put back."""
    build = training.build_trainer

    def with_callback(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(callback)
        return trainer

    monkeypatch.setattr(training, "build_trainer", with_callback)
    return build


def interrupt_training_at(monkeypatch, step: int):
    """Every trainer ``training.build_trainer`` builds from now on gets a Ctrl-C at ``step``; returns the
    unpatched ``build_trainer``, to put back for the resume."""
    return add_to_every_trainer(monkeypatch, InterruptAtStep(step))
