"""A sweep on a SLURM cluster: one batch job per run, submitted with ``sbatch``.

Each job runs ``sffn ablate GRID --run RUN`` (the same grid, overrides and output directory as the
submitting command), which trains that one run into the shared sweep directory, or resumes it from its
last checkpoint, or skips it when finished; so a job that was cancelled, preempted or ran out of time is
continued by submitting again, and ``sffn report`` collects the runs as it does local ones. Scripts are
written to ``SWEEP_DIR/slurm/<run>.sbatch``, job output to ``SWEEP_DIR/slurm/<run>-<job id>.out``, and the
submitted job ids to ``SWEEP_DIR/slurm/jobs.json``. Lightning reads the job's SLURM environment, so a run
with ``train.devices`` or ``train.num_nodes`` above 1 gets that many tasks, one process per device.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from sffn_lab.errors import UserError

JOBS_DIR = "slurm"
JOBS_FILE = "jobs.json"


def job_script(run_name: str, config_train, job_command: list[str], sweep_dir: Path,
               sbatch_options: list[str]) -> str:
    """The batch script of one run: SBATCH header (name, output, nodes, tasks, GPUs; an option the user
    gives replaces the default of the same name), the submitting directory, and the ``srun`` of
    ``job_command``."""
    t = config_train
    user = [option if option.startswith("-") else f"--{option}" for option in sbatch_options]
    given = {option.split("=", 1)[0] for option in user}
    defaults = [f"--job-name={sweep_dir.name}/{run_name}",
                f"--output={sweep_dir / JOBS_DIR / run_name}-%j.out",
                f"--nodes={t.num_nodes}",
                f"--ntasks-per-node={t.devices}"]
    if t.accelerator != "cpu":
        defaults.append(f"--gpus-per-node={t.devices}")
    header = [option for option in defaults if option.split("=", 1)[0] not in given] + user
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in header),
             f"# sffn ablate: run {run_name} of the sweep in {sweep_dir}; resubmitting continues it from its last "
             "checkpoint",
             f"cd {shlex.quote(os.getcwd())}",
             "srun " + shlex.join(job_command)]
    return "\n".join(lines) + "\n"


def run_command(grid: Path, out: Path, overrides: list[str], seed: int, run_dir_name: str) -> list[str]:
    """The command a job runs: this run of the grid only, with the submitter's overrides."""
    command = [sys.executable, "-m", "sffn_lab", "ablate", str(Path(grid).resolve()), "--out", str(Path(out).resolve())]
    for override in overrides:
        command += ["--set", override]
    return [*command, "--seeds", str(seed), "--run", run_dir_name]


def job_scripts(sweep, sweep_dir: Path, grid: Path, out: Path, overrides: list[str],
                sbatch_options: list[str]) -> dict[str, tuple[Path, str]]:
    """One script per planned run: run directory name → (where it is written, its text)."""
    scripts = {}
    for run in sweep.runs:
        command = run_command(grid, out, overrides, run.seed, run.dir_name)
        text = job_script(run.dir_name, run.config.train, command, sweep_dir.resolve(), sbatch_options)
        scripts[run.dir_name] = (sweep_dir / JOBS_DIR / f"{run.dir_name}.sbatch", text)
    return scripts


def queued_jobs(sweep_dir: Path) -> dict[str, str]:
    """Run directory name → job id of the jobs submitted before that SLURM still lists (pending or
    running); empty when ``squeue`` is not on PATH or nothing was submitted."""
    recorded = read_jobs(sweep_dir)
    if not recorded or shutil.which("squeue") is None:
        return {}
    listed = subprocess.run(["squeue", "--noheader", "--format=%i", f"--jobs={','.join(recorded.values())}"],
                            capture_output=True, text=True, check=False).stdout.split()
    return {name: job for name, job in recorded.items() if job in listed}


def read_jobs(sweep_dir: Path) -> dict[str, str]:
    path = sweep_dir / JOBS_DIR / JOBS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def submit(scripts: dict[str, tuple[Path, str]], sweep_dir: Path) -> dict[str, str]:
    """Write each script and ``sbatch`` it; records and returns run directory name → job id."""
    (sweep_dir / JOBS_DIR).mkdir(parents=True, exist_ok=True)
    for path, text in scripts.values():
        path.write_text(text)
    if shutil.which("sbatch") is None:
        raise UserError(f"sbatch is not on PATH: this is not a SLURM login node. The job scripts are in "
                        f"{sweep_dir / JOBS_DIR}; submit them there with sbatch, or run one with bash to test it.")
    jobs = read_jobs(sweep_dir)
    submitted = {}
    for name, (script, _) in scripts.items():
        result = subprocess.run(["sbatch", str(script)], capture_output=True, text=True, check=False)
        found = re.search(r"Submitted batch job (\d+)", result.stdout)
        if result.returncode != 0 or not found:
            _write_jobs(sweep_dir, {**jobs, **submitted})
            raise UserError(f"sbatch refused {script} (exit {result.returncode}): "
                            f"{(result.stderr or result.stdout).strip()}. Jobs submitted so far: {len(submitted)}.")
        submitted[name] = found.group(1)
    _write_jobs(sweep_dir, {**jobs, **submitted})
    return submitted


def _write_jobs(sweep_dir: Path, jobs: dict[str, str]) -> None:
    (sweep_dir / JOBS_DIR / JOBS_FILE).write_text(json.dumps(jobs, indent=1) + "\n")
