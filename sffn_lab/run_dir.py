"""A run directory: where it is created, the files it holds, and its status.

``<train.out_dir>/<name>-<timestamp>/`` holds ``config.yaml`` (the resolved config), ``tokenizer.json``,
``metrics.csv`` and ``tensorboard/`` (``sffn_lab.loggers``), ``checkpoints/`` (``sffn_lab.checkpoints``),
``status.json`` (running / interrupted / failed / finished; while running, rewritten after every validation and
checkpoint with the step, tokens, wall time, last validation loss and ETA: ``callbacks.StatusFile``) and, when the
run ends, ``summary.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sffn_lab.config import Config
from sffn_lab.errors import UserError

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
TOKENIZER_FILE = "tokenizer.json"  # the corpus' tokenizer, so that sampling needs no corpus
METRICS_FILE = "metrics.csv"
CHECKPOINTS = "checkpoints"
LAST_CKPT = "last.ckpt"
RUN_DIR_ENV = "SFFN_RUN_DIR"  # passes rank 0's run directory to the other DDP ranks


@dataclass(frozen=True)
class RunDir:
    """One run directory's layout (the module docstring): the only place its files are named."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir:
        """The run a checkpoint file belongs to (``<run>/checkpoints/<name>.ckpt``)."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def status(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def expert_usage(self) -> Path:
        """The heatmap of expert usage per layer, redrawn at every validation."""
        return self.path / "expert_usage.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CKPT

    def best_checkpoints(self) -> list[Path]:
        """The run's best-<step>.ckpt files, earliest step first."""
        return sorted(self.checkpoints.glob("best-*.ckpt"), key=lambda p: int(p.stem.split("-")[-1]))

    def is_run(self) -> bool:
        """Whether this is a run directory (it holds the run's config)."""
        return self.config.is_file()

    def read_summary(self) -> dict[str, Any]:
        """summary.json of a finished run; {} before the run has finished."""
        return json.loads(self.summary.read_text()) if self.summary.is_file() else {}

    def read_status(self) -> dict[str, Any]:
        return json.loads(self.status.read_text()) if self.status.is_file() else {}

    def write_status(self, status: str, **extra: Any) -> None:
        """Replace status.json atomically: ``{"status": status, **extra}``."""
        tmp = self.path / f".{STATUS_FILE}.tmp"
        tmp.write_text(json.dumps({"status": status, **extra}, indent=2))
        os.replace(tmp, self.status)

    def finished(self) -> bool:
        return self.read_status().get("status") == "finished" and self.summary.is_file()


def new_run_dir(config: Config, path: Path | None = None) -> Path:
    """A fresh directory: ``path`` if given, else ``<train.out_dir>/<name>-<timestamp>`` (suffixed if taken)."""
    out = Path(config.train.out_dir) if path is None else Path(path).parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the output directory '{out}': {exc}.") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"The output directory '{out}' is not writable. Choose another with --out.")
    if path is not None:
        Path(path).mkdir()
        return Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = out / f"{config.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = out / f"{config.name}-{stamp}-{suffix}"
    run_dir.mkdir()
    return run_dir


def record_failure(run_dir: Path, step: int, exc: BaseException, created: bool) -> None:
    """Mark the run failed; a run directory this call ``created`` is removed if it holds no checkpoint."""
    run = RunDir(run_dir)
    if created and not any(run.checkpoints.glob("*.ckpt")):
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    run.write_status("failed", step=step, error=str(exc) or type(exc).__name__)


def launched_rank_run_dir(given: Path | None) -> Path:
    """The run directory of a rank other than 0: inherited from rank 0 on its node, or, on another node,
    the one given on every node's command line (``sffn train --run-dir``)."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited)
    if given is None:
        raise UserError(
            "This process is a rank other than 0 of a multi-process run started by an external launcher (several "
            "nodes, torchrun or srun), so it cannot know the run directory rank 0 creates: pass the same "
            "--run-dir PATH (on a filesystem every node shares) to every process."
        )
    return Path(given)


def is_launched_rank() -> bool:
    """True in every process of a multi-process run but global rank 0: the ranks Lightning's DDP launcher
    starts, and those of an external launcher (torchrun sets RANK, srun SLURM_PROCID, a launch by hand
    NODE_RANK and LOCAL_RANK)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return True
    for global_rank in ("RANK", "SLURM_PROCID"):
        if global_rank in os.environ:
            return os.environ[global_rank] != "0"
    return os.environ.get("NODE_RANK", "0") != "0"


EVERY_TOKEN = "every token of the split"


def eval_protocol(config: Config) -> str:
    """With what context each scored token is predicted: the evaluation protocol, stated with every result."""
    S, m = config.data.seq_len, config.model
    if m.memory_segments:
        return (f"each split in order as contiguous streams (up to data.eval_batch_size), {S}-token segments with a "
                f"memory of {m.memory_segments} segment(s) ({m.memory_segments * S} tokens)")
    stride = config.eval.stride
    if stride and stride < S:
        return f"sliding {S}-token windows, stride {stride}: every token after the first window sees ≥ {S - stride}"
    return f"non-overlapping {S}-token windows: a token sees 0 … {S - 1} earlier tokens ({(S - 1) / 2:g} on average)"


def scored_tokens(config: Config) -> str:
    """Which tokens the reported losses cover, so that numbers are compared on the same token sets."""
    m = config.model
    if m.backbone == "smlp" and m.smlp.routing == "partial_prediction" and m.smlp.n_sparse_blocks:
        kept = 1 - m.smlp.prediction_fraction
        return f"the last {kept:.0%} of each {config.data.seq_len}-token window only (partial prediction)"
    return EVERY_TOKEN
