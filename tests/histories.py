"""A run's logged history as plain data, for comparing an interrupted-and-resumed run with an uninterrupted one.

Wall-clock columns (``elapsed_s``, ``tok/s``) differ between any two runs and are left out.
"""

from __future__ import annotations

import csv
from pathlib import Path

TIMING = {"elapsed_s", "tok/s"}


def csv_history(run_dir: Path) -> list[dict[str, str]]:
    """The rows of metrics.csv in order, without the timing columns and without empty cells."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v != "" and k not in TIMING} for row in csv.DictReader(f)]


def tensorboard_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag → [(step, value)] as TensorBoard shows it (events of purged steps dropped), timing tags left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag not in TIMING}
