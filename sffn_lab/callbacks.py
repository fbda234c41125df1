"""Lightning callbacks of sffn-lab: step-based progress (a bar, plain lines in batch jobs, and the run's
``status.json``), a final validation, and Ctrl-C handling."""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from sffn_lab.durations import format_duration
from sffn_lab.errors import UserError
from sffn_lab.run_dir import RunDir


class TrainingInterrupted(UserError):
    """The user pressed Ctrl-C; a checkpoint was saved at a step boundary."""

    exit_code = 130


class StepProgressBar(RichProgressBar):
    """A rich progress bar counted in optimizer steps (runs are step-based, not epoch-based), showing the
    training loss, tokens/s and the latest validation loss with its step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.last_validation: tuple[int, float] | None = None

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.last_validation = trainer.global_step, float(trainer.callback_metrics["val/loss"])
        super().on_validation_end(trainer, pl_module)  # redraws the metrics

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        if self.last_validation is not None:
            step, loss = self.last_validation
            metrics["val/loss"] = f"{loss:.4f} (step {step})"
        return metrics

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps - self.trainer.global_step if self.trainer.max_steps > 0 else float("inf")


class PlainProgress(L.Callback):
    """For batch jobs (standard output not a terminal): one flushed line every ``every`` steps and after
    each validation, with step, loss, tokens/s, elapsed time and an ETA."""

    def __init__(self, every: int, stream=None):
        self.every = max(1, every)
        self.stream = stream
        self._start: float | None = None
        self._start_step = 0

    def _say(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or not trainer.is_global_zero or self._start is None:
            return
        elapsed = time.perf_counter() - self._start
        eta = eta_seconds(elapsed, step - self._start_step, trainer.max_steps - step)
        metrics = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if "tok/s" in metrics:
            parts.append(f"tok/s {float(metrics['tok/s']):,.0f}")
        parts += [f"elapsed {format_duration(elapsed)}", f"ETA {format_duration(eta)}"]
        self._say("  ".join(parts))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self._say(f"step {trainer.global_step}/{trainer.max_steps}  "
                      f"val/loss {float(trainer.callback_metrics['val/loss']):.4f}")


def eta_seconds(elapsed: float, steps_done: int, steps_left: int) -> float:
    """The time the remaining steps take at the rate of the steps done so far; NaN before the first step."""
    return elapsed / steps_done * steps_left if steps_done else float("nan")


class StatusFile(L.Callback):
    """Keeps ``status.json`` telling where a running run is, for a user or a cluster script that polls it: after
    every validation and every checkpoint (rank 0), the step, tokens seen, wall time of the run, the last
    validation loss and bits, and an ETA at this process' pace; each write replaces the file atomically."""

    def __init__(self, run_dir: Path):
        self.run = RunDir(run_dir)
        self._start: float | None = None
        self._start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._write(trainer, pl_module)

    def _write(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or self._start is None:
            return
        step, metrics = trainer.global_step, trainer.callback_metrics
        eta = eta_seconds(time.perf_counter() - self._start, step - self._start_step, trainer.max_steps - step)
        self.run.write_status(
            "running", step=step, max_steps=trainer.max_steps, tokens_seen=pl_module.tokens_seen,
            elapsed_s=round(pl_module.wall_time_s(), 3), eta_s=None if math.isnan(eta) else round(eta, 1),
            **{key.replace("/", "_"): float(metrics[key]) for key in ("val/loss", "val/bits") if key in metrics},
        )


class ValidateAtLastStep(L.Callback):
    """Stop at ``max_steps`` through ``should_stop`` so that Lightning validates the final model."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class CheckpointOnInterrupt(L.Callback):
    """First Ctrl-C: finish the current step, save ``last.ckpt``, stop. Second Ctrl-C: stop at once."""

    def __init__(self, last_checkpoint: Path):
        self.last_checkpoint = Path(last_checkpoint)
        self.requested = False
        self._previous_handler = None

    def _on_sigint(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)

    def on_train_start(self, trainer, pl_module) -> None:
        self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_end(self, trainer, pl_module) -> None:
        signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Every rank stops at the same step (saving is collective) when any of them saw Ctrl-C.
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            trainer.save_checkpoint(self.last_checkpoint)
            self.on_train_end(trainer, pl_module)
            raise TrainingInterrupted(
                f"Interrupted at step {trainer.global_step}; saved {self.last_checkpoint}. "
                f"Continue with: sffn train --resume {RunDir.of_checkpoint(self.last_checkpoint).path}"
            )


class UsageHeatmap(L.Callback):
    """At the end of training, draw the last validation's expert usage (layer × expert) into a PNG."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module) -> None:
        usage = pl_module.last_val_usage
        if not usage or not trainer.is_global_zero:
            return
        from sffn_lab.analysis.usage import plot_usage_heatmap

        plot_usage_heatmap({f"layer {layer}": counts for layer, counts in sorted(usage.items())}, self.path)
