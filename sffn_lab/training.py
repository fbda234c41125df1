"""Run directories, the Lightning Trainer, and the train / resume / evaluate entry points.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.csv`` (CSVLogger),
``checkpoints/`` (last and best), ``status.json`` (running / finished / failed) and, when the
run ends, ``summary.json``. Everything that can fail because of the user's input (config, corpus,
model sizes) is checked before the run directory is created.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint

from sffn_lab.analysis.model_cost import count_model
from sffn_lab.callbacks import (
    CheckpointOnInterrupt,
    PlainProgress,
    StepProgressBar,
    TrainingInterrupted,
    UsageHeatmap,
    ValidateAtLastStep,
)
from sffn_lab.config import (
    Config,
    apply_overrides,
    from_dict,
    load_config,
    read_yaml,
    save_config,
    to_dict,
    validate,
)
from sffn_lab.data.datamodule import LMDataModule
from sffn_lab.data.tokenizers import tokenizer_to_dict
from sffn_lab.errors import UserError
from sffn_lab.lm_module import CorpusInfo, LanguageModelModule
from sffn_lab.loggers import FlushLogsBeforeCheckpoint, build_loggers, check_installed, parse_loggers

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
LAST_CKPT = "last.ckpt"
TOKENIZER_FILE = "tokenizer.json"  # the corpus' tokenizer, so that sampling needs no corpus
RUN_DIR_ENV = "SFFN_RUN_DIR"  # passes rank 0's run directory to the other DDP ranks


def quiet_lightning() -> None:
    """Silence Lightning's notices that say nothing about this run (tips, device lists, known layouts)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*exists and is not empty.*",
        ".*LeafSpec.*",
        ".*does not have many workers.*",
        ".*weights_only.*",
        ".*is not supported on CPU. Using `precision=.*",  # build_trainer refuses the substitution itself
    ):
        warnings.filterwarnings("ignore", message=pattern)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place.

    A run killed mid-save leaves the previous checkpoint intact; a half-written file is never
    under the checkpoint's name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # the data is on disk before the name points at it
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(
                f"Could not write checkpoint '{path}': {exc.strerror or exc}. The run stopped at step "
                f"{checkpoint.get('global_step', '?')}; earlier checkpoints are intact. Free some space "
                f"(or fix the permissions) and continue with: sffn train --resume {path.parent.parent}"
            ) from None


@dataclass
class RunSummary:
    run_dir: str
    status: str
    step: int
    val_loss: float | None
    val_bits: float | None
    val_ppl: float | None
    entropy_rate_bits: float | None
    entropy_gap_bits: float | None
    unit: str
    scored: str  # which tokens the validation loss covers
    total_params: int
    active_params: int
    flops_per_token: int
    tokens_seen: int
    wall_time_s: float
    best_checkpoint: str | None


def corpus_info(data: LMDataModule) -> CorpusInfo:
    return CorpusInfo(
        vocab_size=data.vocab_size,
        unit=data.unit,
        entropy_rate_bits=data.entropy_rate_bits,
    )


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


def write_status(run_dir: Path, status: str, **extra: Any) -> None:
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps({"status": status, **extra}, indent=2))
    os.replace(tmp, run_dir / STATUS_FILE)


def read_status(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}  # Lightning's


def build_trainer(
    config: Config, run_dir: Path, progress: bool, resume_step: int | None = None, rank_zero: bool = True
) -> L.Trainer:
    t = config.train
    checkpoints = run_dir / "checkpoints"
    best = ModelCheckpoint(
        dirpath=checkpoints, filename="best-{step}", monitor="val/loss", mode="min", save_top_k=1,
        auto_insert_metric_name=False,
    )
    last = ModelCheckpoint(
        dirpath=checkpoints, save_top_k=0, save_last=True, every_n_train_steps=t.checkpoint_every or t.val_every,
    )
    callbacks: list[L.Callback] = [best, last, ValidateAtLastStep(), CheckpointOnInterrupt(checkpoints / LAST_CKPT)]
    callbacks += [UsageHeatmap(run_dir / "expert_usage.png"), FlushLogsBeforeCheckpoint()]
    bar = progress and sys.stdout.isatty()
    if bar:
        callbacks.append(StepProgressBar(leave=True))
    elif progress:  # a batch job's log file: plain lines
        callbacks.append(PlainProgress(t.log_every))
    loggers = build_loggers(parse_loggers(t.loggers), run_dir, config.name, resume_step, rank_zero)
    try:
        trainer = _lightning_trainer(t, loggers, callbacks, bar, run_dir)
    except (ValueError, ImportError, MisconfigurationException) as exc:
        raise UserError(
            f"Lightning cannot train with train.accelerator={t.accelerator}, train.devices={t.devices}, "
            f"train.strategy={t.strategy}, train.precision={t.precision}: {exc}"
        ) from None
    if PRECISION_ALIASES.get(t.precision, t.precision) != trainer.precision:
        raise UserError(
            f"train.precision={t.precision} is not available on {type(trainer.accelerator).__name__}: Lightning "
            f"would run {trainer.precision} instead. Choose that precision explicitly (on the CPU: 32-true, "
            "bf16-mixed or bf16-true; 16-mixed and 16-true need a GPU)."
        )
    return trainer


def _lightning_trainer(t, loggers: list, callbacks: list, progress: bool, run_dir: Path) -> L.Trainer:
    return L.Trainer(
        max_steps=t.max_steps,
        val_check_interval=t.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches or 1.0,
        log_every_n_steps=t.log_every,
        gradient_clip_val=t.grad_clip or None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
        deterministic=t.deterministic,
    )


def prepare(config: Config) -> tuple[LMDataModule, LanguageModelModule]:
    """Load the corpus and build the model; raises ``UserError`` before anything is written."""
    quiet_lightning()
    check_installed(parse_loggers(config.train.loggers))
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    data = LMDataModule(config.data, seed=config.train.seed)
    module = LanguageModelModule.create(config, corpus_info(data))
    return data, module


def is_launched_rank() -> bool:
    """True in the processes Lightning's DDP launcher starts for ranks other than 0."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def train(
    config: Config, progress: bool = True, resume_dir: Path | None = None, run_dir: Path | None = None
) -> RunSummary:
    """Train ``config`` in a new run directory (``run_dir`` or a timestamped one), or continue ``resume_dir``.

    Under multi-process strategies every rank runs this function; rank 0 creates the run
    directory and the other ranks find it in the environment they inherit.
    """
    data, module = prepare(config)
    ckpt_path = resume_step = None
    created = False
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        last = run_dir / "checkpoints" / LAST_CKPT
        if last.is_file():
            checkpoint = read_checkpoint(last)
            check_resumable(checkpoint, config, last)
            ckpt_path, resume_step = str(last), checkpoint["global_step"]
    elif is_launched_rank():
        run_dir = Path(os.environ[RUN_DIR_ENV])
    else:
        run_dir = new_run_dir(config, run_dir)
        created = True
        save_config(config, run_dir / CONFIG_FILE)
        (run_dir / TOKENIZER_FILE).write_text(json.dumps(tokenizer_to_dict(data.corpus.tokenizer)))
    os.environ[RUN_DIR_ENV] = str(run_dir)
    rank_zero = not is_launched_rank()
    if rank_zero:
        write_status(run_dir, "running", step=0)
    trainer = None
    try:
        trainer = build_trainer(config, run_dir, progress and rank_zero, resume_step, rank_zero)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except TrainingInterrupted:
        if rank_zero:
            write_status(run_dir, "interrupted", step=trainer.global_step)
        raise
    except BaseException as exc:
        if rank_zero:
            _record_failure(run_dir, trainer.global_step if trainer else 0, exc, created)
        raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    if "val/loss" not in trainer.callback_metrics:  # resumed from a checkpoint already at max_steps
        trainer.validate(module, datamodule=data, verbose=False)
    summary = summarize(run_dir, trainer, module, module.wall_time_s())
    if rank_zero:
        (run_dir / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2))
        write_status(run_dir, "finished", step=trainer.global_step)
    return summary


def _record_failure(run_dir: Path, step: int, exc: BaseException, created: bool) -> None:
    """Mark the run failed; a run directory this call ``created`` is removed if it holds no checkpoint."""
    checkpoints = run_dir / "checkpoints"
    if created and not any(checkpoints.glob("*.ckpt")):
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    write_status(run_dir, "failed", step=step, error=str(exc) or type(exc).__name__)


def summarize(run_dir: Path, trainer: L.Trainer, module: LanguageModelModule, wall: float) -> RunSummary:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    ckpt = trainer.checkpoint_callback
    cost = count_model(module.config.model, module.corpus.vocab_size, module.config.data.seq_len)
    summary = RunSummary(
        run_dir=str(run_dir),
        status="finished",
        step=trainer.global_step,
        val_loss=metrics.get("val/loss"),
        val_bits=metrics.get("val/bits"),
        val_ppl=metrics.get("val/ppl"),
        entropy_rate_bits=module.corpus.entropy_rate_bits,
        entropy_gap_bits=metrics.get("val/entropy_gap_bits"),
        unit=module.corpus.unit,
        scored=scored_tokens(module.config),
        total_params=cost.total_params,
        active_params=cost.active_params,
        flops_per_token=cost.flops_per_token,
        tokens_seen=module.tokens_seen,
        wall_time_s=wall,
        best_checkpoint=(ckpt.best_model_path or None) if ckpt else None,
    )
    return summary


EVERY_TOKEN = "every token of the split"


def scored_tokens(config: Config) -> str:
    """Which tokens the reported losses cover, so that numbers are compared on the same token sets."""
    m = config.model
    if m.backbone == "smlp" and m.smlp.routing == "partial_prediction" and m.smlp.n_sparse_blocks:
        kept = 1 - m.smlp.prediction_fraction
        return f"the last {kept:.0%} of each {config.data.seq_len}-token window only (partial prediction)"
    return EVERY_TOKEN


def load_run_config(run_dir: Path, overrides: list[str]) -> Config:
    """The config a run was made with; only ``train.max_steps`` may be changed when resuming."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no {CONFIG_FILE} in it).")
    config = load_config(run_dir / CONFIG_FILE, overrides)
    saved = from_dict(Config, read_yaml(run_dir / CONFIG_FILE))
    changed = _diff(to_dict(saved), to_dict(config))
    changed.discard("train.max_steps")
    if changed:
        raise UserError(
            f"Cannot resume '{run_dir}' with a different config (changed: {', '.join(sorted(changed))}). "
            "Only train.max_steps may change when resuming; start a new run for anything else."
        )
    return config


def _diff(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k in a.keys() | b.keys():
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys |= _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.add(f"{prefix}{k}")
    return keys


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The contents of an sffn-lab checkpoint file (tensors memory-mapped); ``UserError`` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint '{path}' does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        reason = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"Checkpoint '{path}' is not a valid sffn-lab checkpoint: it is cut short or corrupt "
            f"({reason}) and was not loaded. Use another checkpoint of the run: checkpoints/best-*.ckpt "
            "(copied to last.ckpt, --resume goes on from it)."
        ) from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint.get("hyper_parameters", {}):
        raise UserError(f"Checkpoint '{path}' is not a valid sffn-lab checkpoint (it holds no config).")
    return checkpoint


def check_resumable(checkpoint: dict[str, Any], config: Config, path: Path) -> None:
    """Refuse to resume ``config`` from a checkpoint of a different model or training setup."""
    changed = _diff(checkpoint["hyper_parameters"]["config"], to_dict(config))
    changed.discard("train.max_steps")
    if changed:
        raise UserError(
            f"Checkpoint '{path}' was written by a run with a different config (changed: "
            f"{', '.join(sorted(changed))}); it cannot continue this run."
        )


def load_checkpoint(path: Path) -> LanguageModelModule:
    """A trained module from a checkpoint file, or a run directory (its best, else last, checkpoint)."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted((path / "checkpoints").glob("best-*.ckpt")) or [path / "checkpoints" / LAST_CKPT]
        path = candidates[-1]
    checkpoint = read_checkpoint(path)
    try:
        module = LanguageModelModule(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        problems = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc)]
        raise UserError(
            f"Checkpoint '{path}' does not match the model its config describes: {problems[0]}"
        ) from None
    return module


def sample(ckpt: Path, prompt: str, tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
    """``tokens`` generated tokens after ``prompt``, decoded, from a checkpoint or run directory; the run's saved
    tokenizer is used (older runs without one rebuild it from the corpus)."""
    from sffn_lab.data.tokenizers import UnencodableText, tokenizer_from_dict
    from sffn_lab.models.sampling import generate

    module = load_checkpoint(ckpt)
    run_dir = Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent.parent
    if (run_dir / TOKENIZER_FILE).is_file():
        tokenizer = tokenizer_from_dict(json.loads((run_dir / TOKENIZER_FILE).read_text()))
    else:
        tokenizer = LMDataModule(module.config.data, seed=module.config.train.seed).corpus.tokenizer
    try:
        ids = tokenizer.encode(prompt) if prompt else [0]
    except UnencodableText as exc:
        raise UserError(f"The prompt cannot be encoded for this model: {exc}.") from None
    generator = torch.Generator().manual_seed(seed)
    out = generate(module.model, torch.tensor([ids], dtype=torch.long), tokens, module.config.data.seq_len,
                   temperature, top_k, generator)
    return tokenizer.decode(out[0].tolist())


def evaluate(ckpt: Path, split: str, config_overrides: list[str] | None = None, progress: bool = False) -> dict:
    """Exact loss over every token of ``split`` ("valid" or "test") with a trained checkpoint."""
    quiet_lightning()
    module = load_checkpoint(ckpt)
    config = module.config
    if config_overrides:
        config = from_dict(Config, apply_overrides(to_dict(config), config_overrides))
        validate(config)
    data = LMDataModule(config.data, seed=config.train.seed)
    if data.vocab_size != module.corpus.vocab_size:
        raise UserError(
            f"The corpus '{config.data.corpus}' has {data.vocab_size} tokens but the checkpoint's model "
            f"expects {module.corpus.vocab_size}: it was trained on a different corpus."
        )
    trainer = L.Trainer(
        accelerator=config.train.accelerator,
        devices=1,
        precision=config.train.precision,  # scored as validation scored it during training
        logger=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    loader = data.test_dataloader() if split == "test" else data.val_dataloader()
    results = trainer.test(module, dataloaders=loader, verbose=False)[0]
    out = {k.split("/", 1)[1]: float(v) for k, v in results.items() if k.startswith("test/")}
    out.update(split=split, corpus=config.data.corpus, unit=module.corpus.unit, scored=scored_tokens(config),
               checkpoint=str(ckpt))
    out["tokens"] = int(out["tokens"])
    return out

