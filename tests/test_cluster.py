"""`sffn ablate --launcher slurm` without a cluster: the job scripts it writes, a submission through a
stand-in `sbatch`, jobs run here as SLURM would run them (a stand-in `srun`, the SLURM environment
Lightning reads), resubmission, and `sffn report` over the finished runs."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import yaml

from tests.support import TINY, run_cli

GRID = {"name": "tiny", "seeds": [0, 1],
        "set": [*TINY, "train.val_every=4", "train.max_steps=8", "train.warmup_steps=2", "train.accelerator=cpu"],
        "runs": [{"name": "dense", "set": ["model.ffn.kind=dense"]},
                 {"name": "sigma_moe", "set": ["model.ffn.kind=sigma_moe", "model.ffn.expert_size=16"]}]}
RUNS = ["dense-s0", "dense-s1", "sigma_moe-s0", "sigma_moe-s1"]


def stand_in(bin_dir: Path, name: str, body: str) -> None:
    """An executable shell script ``name`` in ``bin_dir`` (put first on PATH)."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def scripts_in(text: str) -> dict[str, list[str]]:
    """Job scripts printed by a dry run: run name → lines."""
    scripts, current = {}, None
    for line in text.splitlines():
        if line.startswith("#!/bin/bash"):
            current = []
        elif current is not None and line.startswith("srun "):
            scripts[shlex.split(line)[-1]] = [*current, line]
            current = None
        elif current is not None:
            current.append(line)
    return scripts


def test_a_dry_run_prints_one_job_script_per_run_and_writes_nothing(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    code, out, err = run_cli(["ablate", grid, "--out", tmp_path / "sweeps", "--launcher", "slurm", "--dry-run",
                              "--sbatch", "partition=gpu", "--sbatch", "--time=02:00:00", "--sbatch", "nodes=1",
                              "--set", "train.lr=0.002"], capsys)
    assert code == 0, err
    scripts = scripts_in(out)
    assert sorted(scripts) == RUNS
    for name, lines in scripts.items():
        header = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
        assert "--partition=gpu" in header and "--time=02:00:00" in header
        assert f"--job-name=tiny/{name}" in header and "--ntasks-per-node=1" in header
        assert [h for h in header if h.startswith("--nodes")] == ["--nodes=1"]  # the user's replaces the default
        assert not any(h.startswith("--gpus") for h in header)  # train.accelerator=cpu
        command = shlex.split(lines[-1])
        assert command[command.index("--out") + 1] == str((tmp_path / "sweeps").resolve())
        assert command[command.index("--seeds") + 1] == name[-1]
        assert "train.lr=0.002" in command
    assert not (tmp_path / "sweeps").exists()


def test_jobs_submitted_run_as_slurm_would_and_resubmitting_skips_finished_and_queued(tmp_path, capsys, monkeypatch):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    sweeps, bin_dir, submitted_log = tmp_path / "sweeps", tmp_path / "bin", tmp_path / "sbatch.log"
    stand_in(bin_dir, "sbatch", f'echo "$1" >> {submitted_log}\n'
                                f'echo "Submitted batch job $((1000 + $(wc -l < {submitted_log})))"')
    stand_in(bin_dir, "srun", 'exec "$@"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    code, out, err = run_cli(["ablate", grid, "--out", sweeps, "--launcher", "slurm"], capsys)
    assert code == 0, err
    sweep = sweeps / "tiny"
    jobs = json.loads((sweep / "slurm" / "jobs.json").read_text())
    assert jobs == {name: str(1001 + i) for i, name in enumerate(RUNS)}
    assert submitted_log.read_text().split() == [str(sweep / "slurm" / f"{name}.sbatch") for name in RUNS]
    assert json.loads((sweep / "sweep.json").read_text())["baseline"] == "dense"

    # two jobs run as SLURM runs them: bash on the script, srun, the job's SLURM variables for Lightning
    for name in ("dense-s0", "sigma_moe-s0"):
        env = {**os.environ, "SLURM_JOB_ID": jobs[name], "SLURM_JOB_NAME": f"tiny/{name}", "SLURM_NTASKS": "1",
               "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
               "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost", "OMP_NUM_THREADS": "1"}
        job = subprocess.run(["bash", str(sweep / "slurm" / f"{name}.sbatch")], env=env, capture_output=True,
                             text=True, timeout=600)
        assert job.returncode == 0, job.stderr[-3000:]
        assert f"{name}: trained" in job.stdout
        assert json.loads((sweep / name / "summary.json").read_text())["step"] == 8

    # resubmission: finished runs are skipped, so are jobs squeue still lists; the rest go again
    stand_in(bin_dir, "squeue", f'echo {jobs["dense-s1"]}')
    code, out, err = run_cli(["ablate", grid, "--out", sweeps, "--launcher", "slurm"], capsys)
    assert code == 0, err
    assert f"dense-s1: job {jobs['dense-s1']} still queued" in out
    assert "sigma_moe-s1: submitted as job 1005" in out and out.count("submitted as job") == 1

    code, out, err = run_cli(["report", sweep], capsys)
    assert code == 0, err
    assert "sigma_moe" in out and "dense" in out


def test_without_sbatch_the_scripts_are_kept_and_the_error_says_where(tmp_path, capsys, monkeypatch):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no squeue
    code, _, err = run_cli(["ablate", grid, "--out", tmp_path / "sweeps", "--launcher", "slurm", "--seeds", "0"],
                           capsys)
    assert code != 0 and "sbatch is not on PATH" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "sweeps" / "tiny" / "slurm").iterdir()) == ["dense-s0.sbatch",
                                                                                           "sigma_moe-s0.sbatch"]
    code, _, err = run_cli(["ablate", grid, "--out", tmp_path / "sweeps", "--run", "dense-s7"], capsys)
    assert code != 0 and "has no run 'dense-s7'" in err and "dense-s0" in err


def test_run_trains_every_seed_of_a_named_run(tmp_path, capsys):
    """``--run NAME`` (a run of the grid, not one seed's directory) trains each of its seeds, in order."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    code, out, err = run_cli(["ablate", grid, "--out", tmp_path / "sweeps", "--run", "dense", "--seeds", "0,1"],
                             capsys)
    assert code == 0, err
    assert "dense-s0: trained" in out and "dense-s1: trained" in out and "sigma_moe" not in out
    assert sorted(p.name for p in (tmp_path / "sweeps" / "tiny").iterdir() if p.is_dir()) == ["dense-s0", "dense-s1"]
