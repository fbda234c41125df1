"""A regular (non-editable) install trains and plans grids from any directory: the experiments ship as package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_install_trains_and_plans_a_shipped_grid_from_another_directory(tmp_path):
    # Built from a copy without the checkout's ``build/``: setuptools reuses that folder, so a module dropped from
    # the package list would still ship from an earlier build's leftovers.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "runs"))
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--quiet", "-w", str(dist)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(dist.glob("sffn_lab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sffn_lab/experiments/default.yaml" in names and "sffn_lab/experiments/paper/avgk.yaml" in names
    assert not any(n.startswith(("experiments/", "kernels/", "cli.py")) for n in names)  # no generic top-level names
    # Every module of the checkout ships: the editable install's import hook would otherwise hide a missing package
    # from the runs below (it resolves ``sffn_lab.<sub>`` from the checkout when the wheel lacks it).
    shipped = {f"sffn_lab/{p.relative_to(ROOT / 'sffn_lab').as_posix()}" for p in (ROOT / "sffn_lab").rglob("*.py")}
    shipped |= {f"sffn_lab/{d}/{p.relative_to(ROOT / d).as_posix()}" for d in ("kernels", "experiments")
                for p in (ROOT / d).rglob("*.py")}
    assert sorted(shipped - set(names)) == []

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the wheel's copy comes before the checkout's editable install

    def sffn(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sffn_lab", *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import sffn_lab, sffn_lab.experiments as e; "
                            "print(sffn_lab.__file__); print(e.DEFAULT_CONFIG)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.count(str(site)) == 2, where.stdout + where.stderr
    trained = sffn("train", "--max-steps", "2", "--set", "train.val_every=2",
                   "--set", "data.synthetic.train_tokens=20000", "--no-progress")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (elsewhere / "runs").is_dir()
    planned = sffn("ablate", "cpu_sigma_moe_ablations", "--dry-run")
    assert planned.returncode == 0 and "cpu_sigma_moe_ablations" in planned.stdout, planned.stderr[-2000:]
