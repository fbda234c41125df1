"""Every run of the σ-MoE paper grids resolves, key by key, to the settings of the authors' sweep file it
names (transcribed in tests/paper_sweeps.py)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from experiments import resolve
from sffn_lab.ablation import load_grid
from tests.paper_sweeps import PAPER_RUNS, SWEEPS, expected_config


def value_at(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


def mismatches(config, expected: dict) -> list[str]:
    """'key: got ≠ want' for every expected key the config does not hold (floats to 1e-12 relative)."""
    out = []
    for key, want in expected.items():
        got = value_at(config, key)
        same = math.isclose(got, want, rel_tol=1e-12) if isinstance(want, float) else got == want
        if not same:
            out.append(f"{key}: {got!r} ≠ {want!r}")
    return out


def grid_runs(grid: str) -> dict:
    sweep = load_grid(resolve(Path(grid)))
    return {r.name: r.config for r in sweep.runs if r.seed == sweep.runs[0].seed}


@pytest.mark.parametrize("grid", sorted({g for g, _ in PAPER_RUNS}))
def test_paper_grid_runs_equal_their_sweep_files(grid):
    runs = grid_runs(grid)
    assert set(runs) == {run for g, run in PAPER_RUNS if g == grid}  # every run has its sweep file, and no more
    for run, config in runs.items():
        assert not mismatches(config, expected_config(grid, run)), (grid, run)


def test_every_transcribed_sweep_is_used():
    assert {path for path, _ in PAPER_RUNS.values()} == set(SWEEPS)


def test_a_grid_that_drifts_from_its_sweep_is_caught():
    grid, run = "paper/sigma_moe_ablations", "sigma_moe"
    config = grid_runs(grid)[run]
    ffn = config.model.ffn
    drifted = dataclasses.replace(config, model=dataclasses.replace(config.model, ffn=dataclasses.replace(
        ffn, sigma_moe=dataclasses.replace(ffn.sigma_moe, entropy_coef=1e-3))))
    assert mismatches(drifted, expected_config(grid, run)) == ["model.ffn.sigma_moe.entropy_coef: 0.001 ≠ 0.0001"]
