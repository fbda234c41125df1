"""The shipped experiments and ablation grids, installed with the package as ``sffn_lab.experiments``.

``sffn train`` without ``--config`` uses ``default.yaml``; ``sffn ablate NAME`` finds a shipped grid by
its name (``cpu_variants``, ``paper/avgk``) when NAME is not a file.
"""

from __future__ import annotations

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
DEFAULT_CONFIG = DIRECTORY / "default.yaml"


def shipped(name: str | Path) -> Path | None:
    """The shipped YAML file called ``name`` (with or without ``.yaml``), or None."""
    name = str(name).removesuffix(".yaml")
    path = DIRECTORY / f"{name}.yaml"
    return path if path.is_file() and DIRECTORY in path.resolve().parents else None


def resolve(path: Path, relative_to: Path | None = None) -> Path:
    """``path`` itself when it is a file (a relative path read from ``relative_to``, by default the working
    directory), else the shipped file of that name, else that path unchanged (for the caller's not-found
    error). ``sffn train -c`` and a grid's ``config:`` (relative to the grid file) both resolve this way."""
    candidate = Path(path) if relative_to is None else Path(relative_to) / path  # an absolute path stays itself
    if candidate.is_file():
        return candidate
    return shipped(path) or candidate


def shipped_names() -> list[str]:
    return sorted(str(p.relative_to(DIRECTORY).with_suffix("")) for p in DIRECTORY.rglob("*.yaml"))
