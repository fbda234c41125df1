"""Run every bench section, then write bench.csv, environment.json and the PNG plots to a directory."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from sffn_lab.bench.alternatives import alternatives
from sffn_lab.bench.gpu import gpu
from sffn_lab.bench.layer_vs_dense import layer_vs_dense
from sffn_lab.bench.lm_throughput import lm_throughput
from sffn_lab.bench.plots import plot_ratios, plot_scaling
from sffn_lab.bench.records import Measurement, write_csv
from sffn_lab.bench.scaling import scaling
from sffn_lab.bench.sizes import FULL, QUICK

THREADS = 2


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def environment() -> dict:
    """Machine, thread and allocator settings the timings depend on (glibc's ``MALLOC_*`` variables change
    whether large tensors are re-faulted from fresh pages every step)."""
    return {
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        "load_average_1min": os.getloadavg()[0],
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def run_bench(
    out: Path, lm_config: Path, quick: bool = False, repeats: int | None = None, threads: int = THREADS,
    on_section: Callable[[str], None] = lambda title: None,
) -> tuple[list[Measurement], dict]:
    """Measure items 1-5 (``quick``: tiny sizes) on ``threads`` threads and write the results to ``out``."""
    sizes = QUICK if quick else FULL
    if repeats is not None:
        sizes = dataclasses.replace(sizes, repeats=repeats, lm_rounds=repeats)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    env_before = environment()
    sections = [
        ("1. σ-MoE layer vs dense FFN", lambda: layer_vs_dense(sizes)),
        ("2. scaling in N_E, G, K", lambda: scaling(sizes)),
        ("3. against other MoE implementations", lambda: alternatives(sizes)),
        ("4. LM training throughput", lambda: lm_throughput(sizes, lm_config)),
        ("5. GPU", lambda: gpu(sizes)),
    ]
    rows: list[Measurement] = []
    for title, section in sections:
        on_section(title)
        rows += section()
    env = {**env_before, "load_average_1min_after": os.getloadavg()[0], "quick": quick}
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "bench.csv")
    (out / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    plot_scaling(rows, out / "scaling.png")
    plot_ratios(rows, out / "ratios.png")
    return rows, env
