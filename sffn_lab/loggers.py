"""The run's metric loggers (``train.loggers``), whose history survives a resume.

- ``csv`` (always): ``metrics.csv``. Lightning's CSV logger deletes an existing file; here a resumed
  run keeps the rows logged up to its checkpoint's step, drops the rows of steps that will be
  repeated, and appends. The rows are flushed to disk at every checkpoint (see
  ``FlushLogsBeforeCheckpoint`` for the one-row window Lightning's hook order leaves).
- ``tensorboard``: events under ``tensorboard/``; a resumed writer purges the events from the
  step after the checkpoint's on (``purge_step``), so TensorBoard shows one history.
- ``wandb`` / ``mlflow`` (optional extras): a resumed run continues the same W&B / MLflow run (its id
  is kept in the run directory).

Every logger counts steps completed (``StepsCompleted``): the row of step 10 holds the 10th optimizer step's
training loss and the validation after it, as the console and the checkpoint names (``best-10.ckpt``) count.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from sffn_lab.errors import UserError
from sffn_lab.run_dir import RunDir

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
TRACKER_IDS = "trackers.json"  # W&B / MLflow run ids, for resuming the same tracker run
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # logger → its Python package


def parse_loggers(text: str) -> list[str]:
    """``"csv,tensorboard"`` → the chosen loggers (csv always first); a clear error for unknown names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise UserError(f"Unknown logger(s) {', '.join(unknown)} in train.loggers. Choose from: {', '.join(LOGGERS)}.")
    return ["csv", *dict.fromkeys(n for n in names if n != "csv")]


def check_installed(names: list[str]) -> None:
    """Refuse, before anything is written, a logger whose package is missing, naming the extra to install."""
    for name in names:
        package = EXTRAS.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(
                f"train.loggers includes '{name}', but the '{package}' package is not installed. "
                f"Install it with: pip install 'sffn-lab[{name}]'"
            )


class StepsCompleted:
    """Logger mixin: Lightning passes the number of optimizer steps done *before* a training step (and before
    the validation that follows it); the log gets the steps completed, one more."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else step + 1)


def steps_completed(logger_class: type[Logger]) -> type[Logger]:
    """``logger_class`` with ``StepsCompleted`` mixed in."""
    return type(logger_class.__name__, (StepsCompleted, logger_class), {})


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is kept and appended to."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class AppendingCSVLogger(StepsCompleted, CSVLogger):
    """``metrics.csv`` directly in the run directory, appended to across resumes."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def keep_history_to(metrics_csv: Path, step: int) -> None:
    """Drop the rows of steps after ``step`` (logged after the checkpoint a run resumes from)."""
    if not metrics_csv.is_file():
        return
    with open(metrics_csv, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = [row for row in reader if row.get("step", "") == "" or int(row["step"]) <= step]
    tmp = metrics_csv.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(metrics_csv)


class FlushLogsBeforeCheckpoint(L.Callback):
    """Write every logger's buffered metrics to disk before each checkpoint, and again right after the step
    a checkpoint ended: Lightning saves end-of-step checkpoints before it logs that step's row, so the row
    reaches the disk at the next hook (validation start or the next step's start). A kill in between (a few
    statements) would lose that one row; every earlier row is on disk before the checkpoint exists."""

    def __init__(self):
        self._pending = False

    def _flush(self, trainer) -> None:
        for logger in trainer.loggers:
            logger.save()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._flush(trainer)
        self._pending = trainer.training

    def _flush_pending(self, trainer) -> None:
        if self._pending:
            self._flush(trainer)
            self._pending = False

    def on_validation_start(self, trainer, pl_module) -> None:
        self._flush_pending(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush_pending(trainer)


def build_loggers(names: list[str], run_dir: Path, run_name: str, resume_step: int | None,
                  rank_zero: bool = True) -> list[Logger]:
    """The loggers of a run; ``resume_step`` is the step of the checkpoint a resumed run continues from.
    Only rank zero touches the run directory's history (other DDP ranks' loggers never write)."""
    if resume_step is not None and rank_zero:
        keep_history_to(RunDir(run_dir).metrics, resume_step)
    loggers: list[Logger] = [AppendingCSVLogger(save_dir=str(run_dir), name="", version="")]
    ids = _read_ids(run_dir)
    if "tensorboard" in names:
        from lightning.pytorch.loggers import TensorBoardLogger

        purge = {"purge_step": resume_step + 1} if resume_step is not None else {}
        loggers.append(steps_completed(TensorBoardLogger)(save_dir=str(run_dir), name="tensorboard", version="",
                                                          default_hp_metric=False, **purge))
    if "wandb" in names:
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        ids.setdefault("wandb", _new_id())
        if wandb.run is not None and wandb.run.id != ids["wandb"]:  # an earlier run of this process (sffn ablate
            wandb.finish()  # trains a grid's runs one after another), which WandbLogger would reuse
        loggers.append(steps_completed(WandbLogger)(name=run_name, id=ids["wandb"], resume="allow",
                                                    save_dir=str(run_dir),
                                                    project=os.environ.get("WANDB_PROJECT", "sffn-lab")))
    if "mlflow" in names:
        loggers.append(_mlflow_logger(run_dir, run_name, ids))
    if ids and rank_zero:
        (run_dir / TRACKER_IDS).write_text(json.dumps(ids))
    return loggers


def _mlflow_logger(run_dir: Path, run_name: str, ids: dict[str, str]) -> Logger:
    """MLflow's logger, into ``MLFLOW_TRACKING_URI`` or else a file store in the run directory (which MLflow 3
    keeps in maintenance mode and opens only with ``MLFLOW_ALLOW_FILE_STORE=true``); continues ``ids["mlflow"]``."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.exceptions import MlflowException

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        uri = f"file:{run_dir / 'mlruns'}"
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        logger = steps_completed(MLFlowLogger)(experiment_name="sffn-lab", run_name=run_name,
                                               run_id=ids.get("mlflow"), tracking_uri=uri)
        ids["mlflow"] = logger.run_id  # creates (or finds) the experiment and the run
    except MlflowException as exc:
        raise UserError(f"MLflow cannot log to '{uri}': {str(exc).splitlines()[0]}") from None
    return logger


def _read_ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / TRACKER_IDS
    return json.loads(path.read_text()) if path.is_file() else {}


def _new_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]


def log_histogram(loggers: list[Logger], key: str, values, step: int) -> None:
    """A histogram of ``values`` [N] in the loggers that draw histograms (TensorBoard, W&B); others skip it."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(key, values.detach().float().cpu(), step)
        elif isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log(
                {key: wandb.Histogram(values.detach().float().cpu().numpy()), "trainer/global_step": step}
            )
