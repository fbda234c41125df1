"""``sffn bench --quick`` end to end (rows and sanity of the numbers, never timings), its baselines and
its memory measure."""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch

from sffn_lab.bench import gpu_check
from sffn_lab.bench.baselines import gshard_moe, masked_dense_moe, python_loop_moe
from sffn_lab.bench.gpu_check import run_gpu_check
from sffn_lab.bench.layer_vs_dense import FLOP_MATCHED
from sffn_lab.bench.memory import saved_tensor_bytes
from sffn_lab.bench.records import NOT_MEASURED_NO_GPU
from sffn_lab.bench.scaling import BANK, LIMIT
from sffn_lab.bench.sizes import QUICK
from sffn_lab.config import FFN_KINDS
from sffn_lab.kernels import triton_available
from sffn_lab.kernels.reference import expert_down_reference, expert_up_reference
from tests.support import host_reads_are_errors, run_cli


def test_quick_bench_writes_every_row_with_finite_positive_numbers(tmp_path):
    from sffn_lab.bench import run_bench
    from sffn_lab.cli import DEFAULT_CONFIG

    threads = torch.get_num_threads()
    try:  # one thread: no OpenMP partner to wait for when other processes share the cores
        run_bench(tmp_path, DEFAULT_CONFIG, quick=True, threads=1)
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    keys = {(r["section"], r["variant"], r["metric"]) for r in rows}
    for variant in ("dense", "sigma_moe", FLOP_MATCHED):
        assert ("layer", variant, "time_ms") in keys and ("layer", variant, "activation_MB") in keys
    for variant in ("dense", "sigma_moe"):
        assert ("lm", variant, "train_tokens_per_s") in keys
    sweeps = (("N_E", QUICK.sweep_experts), ("G", QUICK.sweep_expert_size), ("K", QUICK.sweep_top_k))
    for label, values in sweeps:  # every point of every sweep, beside its FLOP-matched dense limit
        for variant in (BANK, LIMIT):
            got = sorted(float(r["x"]) for r in rows if r["section"] == f"scaling_{label}" and r["variant"] == variant)
            assert got == sorted(values), (label, variant)
    limits = {r["case"]: r for r in rows if r["variant"] == LIMIT}
    for r in rows:  # each limit row's ratio is the bank's time at that point over the dense time
        if r["variant"] == BANK:
            limit = limits[r["case"]]
            assert float(limit["ratio"]) == pytest.approx(float(r["value"]) / float(limit["value"]), rel=1e-6)
    alternatives = {r["variant"] for r in rows if r["section"] == "alternatives"}
    assert len(alternatives) == 5 and any(v.startswith("GShard") for v in alternatives)
    gpu = [r for r in rows if r["section"] == "gpu"]
    assert len(gpu) == 3
    for r in rows:
        if r["section"] == "gpu" and not torch.cuda.is_available():
            assert r["status"] == NOT_MEASURED_NO_GPU and r["value"] == ""
            continue
        value, ratio = float(r["value"]), float(r["ratio"])
        assert math.isfinite(value) and value > 0 and math.isfinite(ratio) and ratio > 0, r
    for name in ("scaling.png", "ratios.png", "environment.json"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("baseline", ["loop", "gshard", "masked"])
def test_baselines_match_float64_reference(baseline):
    T, D, E, G, K = 48, 12, 5, 7, 2
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(E, D, G, dtype=torch.float64, requires_grad=True)
    values = torch.randn(E, G, D, dtype=torch.float64, requires_grad=True)
    indices = torch.rand(T, E).topk(K, dim=1).indices
    gates = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    fn = {"loop": python_loop_moe, "masked": masked_dense_moe,
          # a capacity no expert can exceed: nothing is dropped
          "gshard": lambda *a: gshard_moe(*a, group_size=16, capacity_factor=E / K)}[baseline]
    leaves = (x, keys, values, gates)
    got = torch.autograd.grad(fn(x, keys, values, indices, gates).square().sum(), leaves)
    ref_y = expert_down_reference(torch.relu(expert_up_reference(x, keys, indices)), values, indices, gates)
    ref = torch.autograd.grad(ref_y.square().sum(), leaves)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gshard_drops_assignments_beyond_capacity():
    T, D, E, G = 32, 4, 4, 3
    x, keys, values = torch.randn(T, D), torch.randn(E, D, G), torch.randn(E, G, D)
    indices = torch.zeros(T, 1, dtype=torch.long)  # every token picks expert 0; capacity is ⌈T/E⌉ = 8
    y = gshard_moe(x, keys, values, indices, torch.ones(T, 1), group_size=T, capacity_factor=1.0)
    assert y[:8].abs().sum() > 0 and y[8:].abs().sum() == 0


def test_saved_bytes_count_each_activation_once_and_skip_parameters():
    weight = torch.nn.Parameter(torch.randn(16, 8))
    x = torch.randn(4, 16, requires_grad=True)
    # both products save x (one storage) and the parameter; relu saves its [4, 8] output
    saved = saved_tensor_bytes(lambda: torch.relu(x @ weight) + x @ weight, [weight])
    assert saved == x.numel() * 4 + 4 * 8 * 4


def test_environment_records_the_allocator_settings_the_timings_depend_on(monkeypatch):
    from sffn_lab.bench.runner import environment

    for name in [k for k in os.environ if k.startswith("MALLOC_")] + ["LD_PRELOAD"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("PATH_UNRELATED", "1")
    assert environment()["allocator_env"] == {"MALLOC_MMAP_MAX_": "0"}


def test_gpu_check_passes_at_quick_sizes_on_this_machine(device):
    """The acceptance check's accuracy and training parts, at toy sizes: on CUDA where there is one, else under
    the Triton interpreter on the CPU."""
    lines = []
    assert run_gpu_check(lines.append, device=device.type, quick=True, speed=False), "\n".join(lines)
    assert sum(line.startswith("PASS  ") for line in lines) == 6 + 2 * len(FFN_KINDS)
    assert not any(line.startswith("FAIL") for line in lines)


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_host_sync_check_passes_every_layer_but_base_and_catches_base(monkeypatch):
    """With host reads made errors (the CPU stand-in for sync debug mode), every FFN kind's layer runs its
    Triton-path forward+backward; BASE, whose auction reads the device, is caught once not excused."""
    monkeypatch.setattr(gpu_check, "host_syncs_are_errors", host_reads_are_errors)
    lines = [r.line() for r in gpu_check.host_sync_checks("cpu", quick=True)]
    assert [line for line in lines if line.startswith("FAIL")] == [], "\n".join(lines)
    assert any("base" in line and "not checked" in line for line in lines)
    monkeypatch.setattr(gpu_check, "SYNCING_KINDS", {})
    failed = [line for line in (r.line() for r in gpu_check.host_sync_checks("cpu", quick=True))
              if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL  base") and "host read" in failed[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(capsys):
    code, out, _ = run_cli(["bench", "--gpu-check"], capsys)
    assert code == 0 and "no CUDA GPU on this machine" in out


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_kernel_resources_compiles_every_gpu_config_for_hopper(tmp_path):
    """``sffn bench --kernel-resources`` (a process without the interpreter): every config of both kernels in
    bf16, fp16 and fp32 compiles for sm_90a through ptxas, each within the GPU's shared memory."""
    import subprocess
    import sys

    from sffn_lab.bench.kernel_resources import HOPPER_SHARED_BYTES
    from sffn_lab.kernels import triton_gather_matmul, triton_weight_grad

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "sffn_lab", "bench", "--kernel-resources", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split("|")[1:-1] for line in (tmp_path / "kernel_resources.md").read_text().splitlines()[2:]]
    configs = triton_gather_matmul.configs(interpreted=False) + triton_weight_grad.configs(interpreted=False)
    assert len(rows) == 3 * len(configs)
    for kernel, config, dtype, registers, spills, shared_kb in rows:
        assert 0 < int(registers) <= 255 and int(spills) >= 0
        assert float(shared_kb) * 1024 <= HOPPER_SHARED_BYTES, f"{kernel} {config} {dtype}: {shared_kb} KB"


def test_kernel_resources_refuses_the_interpreter(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code, out, err = run_cli(["bench", "--kernel-resources"], capsys)
    assert code == 2 and "without TRITON_INTERPRET=1" in out + err
