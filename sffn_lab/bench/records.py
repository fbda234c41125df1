"""One measured number per row, and the CSV they are written to."""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

NOT_MEASURED_NO_GPU = "not measured (no GPU)"


@dataclass
class Measurement:
    """``value`` of ``metric`` for ``variant`` in ``case``; ``ratio`` = value / value of ``reference``.

    ``x`` is the swept size of scaling rows (N_E, G or K). ``value`` and ``ratio`` are None for rows that
    were not measured (``status`` says why).
    """

    section: str
    case: str
    variant: str
    metric: str
    value: float | None
    ratio: float | None = None
    reference: str = ""
    x: float | None = None
    status: str = "measured"
    note: str = ""


def with_ratios(rows: list[Measurement], reference: str) -> list[Measurement]:
    """Set every row's ratio to its value / the value of the row of variant ``reference`` (same metric)."""
    base = {r.metric: r.value for r in rows if r.variant == reference}
    for r in rows:
        r.ratio, r.reference = r.value / base[r.metric], reference
    return rows


def write_csv(rows: list[Measurement], path: Path) -> None:
    names = [f.name for f in dataclasses.fields(Measurement)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in dataclasses.asdict(r).items()})
