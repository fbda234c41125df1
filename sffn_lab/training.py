"""The Lightning Trainer and the entry points: train (new or resumed), evaluate, sample.

Everything that can fail because of the user's input (config, corpus, model sizes, loggers) is checked
before the run directory (``sffn_lab.run_dir``) is created.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint

from sffn_lab.analysis.model_cost import count_model
from sffn_lab.callbacks import (
    CheckpointOnInterrupt,
    PlainProgress,
    StatusFile,
    StepProgressBar,
    TrainingInterrupted,
    UsageHeatmap,
    ValidateAtLastStep,
)
from sffn_lab.checkpoints import (
    SafeCheckpointIO,
    check_resumable,
    read_checkpoint,
)
from sffn_lab.config import (
    Config,
    TrainConfig,
    apply_overrides,
    from_dict,
    save_config,
    to_dict,
    validate,
)
from sffn_lab.data.datamodule import LMDataModule
from sffn_lab.data.tokenizers import tokenizer_to_dict
from sffn_lab.errors import UserError
from sffn_lab.export import load_trained, saved_tokenizer
from sffn_lab.kernels.precision import fp32_matmul_precision
from sffn_lab.lm_module import CorpusInfo, LanguageModelModule
from sffn_lab.loggers import FlushLogsBeforeCheckpoint, build_loggers, check_installed, parse_loggers
from sffn_lab.run_dir import (
    RUN_DIR_ENV,
    RunDir,
    eval_protocol,
    is_launched_rank,
    launched_rank_run_dir,
    new_run_dir,
    record_failure,
    scored_tokens,
)


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


@dataclass
class RunSummary:
    run_dir: str
    status: str
    step: int
    val_loss: float | None
    val_bits: float | None
    val_ppl: float | None
    val_bpb: float | None  # bits per byte of the text (word and subword corpora)
    entropy_rate_bits: float | None
    entropy_gap_bits: float | None
    unit: str
    scored: str  # which tokens the validation loss covers
    protocol: str  # with what context they are predicted (run_dir.eval_protocol)
    total_params: int
    active_params: int
    flops_per_token: int
    tokens_seen: int
    wall_time_s: float
    best_checkpoint: str | None
    command: str  # the command line that trained the run (its last segment, when resumed)


def corpus_info(data: LMDataModule) -> CorpusInfo:
    corpus = data.corpus
    per_byte = None
    if corpus.unit != "byte" and corpus.split_bytes:
        per_byte = {split: len(corpus.splits[split]) / n for split, n in corpus.split_bytes.items() if n}
    return CorpusInfo(
        vocab_size=data.vocab_size,
        unit=data.unit,
        entropy_rate_bits=data.entropy_rate_bits,
        tokens_per_byte=per_byte,
    )


PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}  # Lightning's


def slow_fp32_warning(t: TrainConfig, capability: tuple[int, int] | None) -> str | None:
    """What to say when ``t`` trains in fp32 with IEEE products on a GPU of this compute capability (None: no
    GPU) whose tensor cores (capability ≥ 8) would run them as TF32; else None."""
    if capability is None or capability[0] < 8 or t.accelerator == "cpu":
        return None
    if PRECISION_ALIASES.get(t.precision, t.precision) != "32-true" or t.matmul_precision != "highest":
        return None
    return ("train.precision=32-true with train.matmul_precision=highest runs every fp32 product in IEEE precision, "
            "off the GPU's tensor cores: --set train.matmul_precision=high runs them as TF32, --precision bf16-mixed "
            "in bf16 (as the paper grids do).")


@contextmanager
def lightning_refusals_as_user_errors(t) -> Iterator[None]:
    """A Trainer that Lightning refuses to build (accelerator, devices, strategy, precision) is the user's
    setting to fix: said in one line, for training and evaluation alike."""
    try:
        yield
    except (ValueError, ImportError, MisconfigurationException) as exc:
        raise UserError(
            f"Lightning cannot run with train.accelerator={t.accelerator}, train.devices={t.devices}, "
            f"train.strategy={t.strategy}, train.precision={t.precision}: {exc}"
        ) from None


def build_trainer(
    config: Config, run_dir: Path, progress: bool, resume_step: int | None = None, rank_zero: bool = True,
    extra_callbacks: Sequence[L.Callback] = (),
) -> L.Trainer:
    t = config.train
    run = RunDir(run_dir)
    checkpoints = run.checkpoints
    best = ModelCheckpoint(
        dirpath=checkpoints, filename="best-{step}", monitor="val/loss", mode="min", save_top_k=1,
        auto_insert_metric_name=False,
    )
    last = ModelCheckpoint(
        dirpath=checkpoints, save_top_k=0, save_last=True, every_n_train_steps=t.checkpoint_every or t.val_every,
    )
    callbacks: list[L.Callback] = [best, last, ValidateAtLastStep(), CheckpointOnInterrupt(run.last_checkpoint)]
    callbacks += [UsageHeatmap(run.expert_usage), FlushLogsBeforeCheckpoint(), StatusFile(run_dir)]
    callbacks += extra_callbacks
    bar = progress and sys.stdout.isatty()
    if bar:
        callbacks.append(StepProgressBar(leave=True))
    elif progress:  # a batch job's log file: plain lines
        callbacks.append(PlainProgress(t.log_every))
    loggers = build_loggers(parse_loggers(t.loggers), run_dir, config.name, resume_step, rank_zero)
    with lightning_refusals_as_user_errors(t):
        trainer = _lightning_trainer(t, loggers, callbacks, bar, run_dir)
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
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        logger=loggers,
        callbacks=callbacks,
        plugins=[SafeCheckpointIO()],
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
    data = LMDataModule.of(config)
    module = LanguageModelModule.create(config, corpus_info(data))
    return data, module


def train(
    config: Config, progress: bool = True, resume_dir: Path | None = None, run_dir: Path | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
) -> RunSummary:
    """Train ``config`` in a new run directory (``run_dir`` or a timestamped one), or continue ``resume_dir``;
    ``extra_callbacks`` join the trainer's own (the GPU check's sync counter, say).

    Under multi-process strategies every rank runs this function; rank 0 creates the run
    directory and the other ranks find it in the environment they inherit.
    """
    data, module = prepare(config)
    ckpt_path = resume_step = None
    created = False
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        last = RunDir(run_dir).last_checkpoint
        if last.is_file():
            checkpoint = read_checkpoint(last)
            check_resumable(checkpoint, config, last)
            ckpt_path, resume_step = str(last), checkpoint["global_step"]
            if (finished := finished_summary(run_dir, resume_step, config.train.max_steps)) is not None:
                return finished
    elif is_launched_rank():
        run_dir = launched_rank_run_dir(run_dir)
    else:
        run_dir = new_run_dir(config, run_dir)
        created = True
    run = RunDir(run_dir)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    rank_zero = not is_launched_rank()
    if rank_zero:
        save_config(config, run.config)  # resumed: a new train.max_steps is the run's from now on
        if created:
            run.tokenizer.write_text(json.dumps(tokenizer_to_dict(data.corpus.tokenizer)))
        run.write_status("running", step=resume_step or 0)
        print(f"run directory: {run_dir}  (follow it: tensorboard --logdir {run_dir})", flush=True)
    trainer = None
    with fp32_matmul_precision(config.train.matmul_precision):
        try:
            trainer = build_trainer(config, run_dir, progress and rank_zero, resume_step, rank_zero, extra_callbacks)
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)  # read through SafeCheckpointIO, weights only
        except TrainingInterrupted:
            if rank_zero:
                run.write_status("interrupted", step=trainer.global_step)
            raise
        except BaseException as exc:
            if rank_zero:
                record_failure(run_dir, trainer.global_step if trainer else 0, exc, created)
            raise
        finally:
            os.environ.pop(RUN_DIR_ENV, None)
        if "val/loss" not in trainer.callback_metrics:  # resumed from a checkpoint already at max_steps
            trainer.validate(module, datamodule=data, verbose=False)
    summary = summarize(run_dir, trainer, module, module.wall_time_s())
    if rank_zero:
        run.summary.write_text(json.dumps(asdict(summary), indent=2))
        run.write_status("finished", step=trainer.global_step)
    return summary


def finished_summary(run_dir: Path, step: int, max_steps: int) -> RunSummary | None:
    """The saved summary of a run whose last checkpoint already reached ``max_steps`` (said so on the console),
    else None."""
    saved = RunDir(run_dir).read_summary() if step >= max_steps else {}
    if saved.get("step") != step:
        return None
    if not is_launched_rank():
        print(f"{run_dir} already finished: {step} of train.max_steps {max_steps} steps done, nothing to train. "
              f"To train it further: sffn train --resume {run_dir} --max-steps N (N > {step}).", flush=True)
    return RunSummary(**{f.name: saved.get(f.name) for f in dataclasses.fields(RunSummary)})


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
        val_bpb=metrics.get("val/bpb"),
        entropy_rate_bits=module.corpus.entropy_rate_bits,
        entropy_gap_bits=metrics.get("val/entropy_gap_bits"),
        unit=module.corpus.unit,
        scored=scored_tokens(module.config),
        protocol=eval_protocol(module.config),
        total_params=cost.total_params,
        active_params=cost.active_params,
        flops_per_token=cost.flops_per_token,
        tokens_seen=module.tokens_seen,
        wall_time_s=wall,
        best_checkpoint=(ckpt.best_model_path or None) if ckpt else None,
        command=shlex.join(["sffn", *sys.argv[1:]]),
    )
    return summary


def sample(ckpt: Path, prompt: str, tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
    """``tokens`` generated tokens after ``prompt``, decoded, from a checkpoint, run directory or export folder;
    its saved tokenizer is used (older runs without one rebuild it from the corpus)."""
    from sffn_lab.data.tokenizers import UnencodableText
    from sffn_lab.models.sampling import generate

    module = load_trained(ckpt)
    if top_k is not None and top_k > module.corpus.vocab_size:
        raise UserError(f"--top-k {top_k} is more than the model's vocabulary of {module.corpus.vocab_size} tokens.")
    tokenizer = saved_tokenizer(ckpt, module)
    try:
        ids = tokenizer.encode(prompt) if prompt else [0]
    except UnencodableText as exc:
        raise UserError(f"The prompt cannot be encoded for this model: {exc}.") from None
    generator = torch.Generator().manual_seed(seed)
    out = generate(module.model, torch.tensor([ids], dtype=torch.long), tokens, module.config.data.seq_len,
                   temperature, top_k, generator)
    return tokenizer.decode(out[0].tolist())


def evaluate(ckpt: Path, split: str, config_overrides: list[str] | None = None, progress: bool = False) -> dict:
    """Exact loss over every token of ``split`` ("valid" or "test") with a trained checkpoint or export folder."""
    quiet_lightning()
    module = load_trained(ckpt)
    config = module.config
    if config_overrides:
        config = from_dict(Config, apply_overrides(to_dict(config), config_overrides))
        validate(config)
    config = dataclasses.replace(config, model=module.config.model)  # the checkpoint's model, whatever --set says
    data = LMDataModule.of(config)
    if data.vocab_size != module.corpus.vocab_size:
        raise UserError(
            f"The corpus '{config.data.corpus}' has {data.vocab_size} tokens but the checkpoint's model "
            f"expects {module.corpus.vocab_size}: it was trained on a different corpus."
        )
    with lightning_refusals_as_user_errors(config.train):
        trainer = L.Trainer(
            accelerator=config.train.accelerator,
            devices=1,
            precision=config.train.precision,  # scored as validation scored it during training
            logger=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
        )
    loader = data.test_dataloader() if split == "test" else data.val_dataloader()
    with fp32_matmul_precision(config.train.matmul_precision):
        results = trainer.test(module, dataloaders=loader, verbose=False)[0]
    out = {k.split("/", 1)[1]: float(v) for k, v in results.items() if k.startswith("test/")}
    out.update(split=split, corpus=config.data.corpus, unit=module.corpus.unit, scored=scored_tokens(config),
               protocol=eval_protocol(config),
               checkpoint=str(ckpt))
    out["tokens"] = int(out["tokens"])
    return out

