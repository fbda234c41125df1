"""``sffn bench --quick`` end to end (rows and sanity of the numbers, never timings), its baselines and
its memory measure."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from sffn_lab.analysis.saved_memory import saved_tensor_bytes
from sffn_lab.bench import gpu_check
from sffn_lab.bench.baselines import gshard_moe, masked_dense_moe, python_loop_moe
from sffn_lab.bench.gpu_check import run_gpu_check
from sffn_lab.bench.layer_vs_dense import FLOP_MATCHED
from sffn_lab.bench.records import NOT_MEASURED_NO_GPU
from sffn_lab.bench.scaling import BANK, LIMIT
from sffn_lab.bench.sizes import QUICK
from sffn_lab.kernels import triton_available
from sffn_lab.kernels.reference import expert_down_reference, expert_up_reference
from sffn_lab.variants import kinds
from sffn_lab.variants import variant as registered_variant
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


def test_gpu_check_passes_at_quick_sizes_on_this_machine(device, tmp_path):
    """The acceptance check's parts at toy sizes (on CUDA where there is one, else under the Triton interpreter),
    every result written to gpu_check.json / .md as soon as it is known, one PASS line per part."""
    written = []

    def say(line: str) -> None:
        lines.append(line)
        if (tmp_path / "gpu_check.json").exists():
            written.append(len(json.loads((tmp_path / "gpu_check.json").read_text())["results"]))

    lines = []
    assert run_gpu_check(say, device=device.type, quick=True, speed=False, out=tmp_path), "\n".join(lines)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [p["name"] for p in saved["parts"]] == ["configs", "precisions", "edges", "training", "host syncs",
                                                      "trainer"]
    n_backends = 2  # triton and torch
    expected = 2 + n_backends * len(gpu_check.PRECISIONS) + (n_backends + 1) + n_backends + 2 * len(kinds())
    expected += len(gpu_check.TRAINER_QUICK_RUNS)
    assert len(saved["results"]) == expected and all(r["passed"] for r in saved["results"])
    assert written == sorted(written) and written[-1] == expected  # the file grew with the results
    assert [line for line in lines if line.startswith("PASS  part")] == [f"PASS  part {p['name']}"
                                                                        for p in saved["parts"]]
    assert "| configs |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_gpu_check_fails_a_wrong_kernel_and_goes_on_after_a_crash(device, monkeypatch):
    """Gates 25% too large make the configs part fail; a part that raises ends in a FAIL line and the next part runs."""
    from sffn_lab.kernels import triton_ops

    true_sorted_gates = triton_ops.sorted_gates
    monkeypatch.setattr(triton_ops, "sorted_gates", lambda gates, plan: true_sorted_gates(gates * 1.25, plan))
    results = list(gpu_check.config_checks(device.type, quick=True))
    assert results and not any(r.passed for r in results)

    def crash():
        raise RuntimeError("kernel launch failed")
        yield

    monkeypatch.setattr(gpu_check, "plan", lambda *a: [
        gpu_check.Part("first", "crashes", 0, 0, 0, crash),
        gpu_check.Part("second", "passes", 0, 0, 0, lambda: iter([gpu_check.CheckResult("second", "ok", True, "")])),
    ])
    lines = []
    assert not run_gpu_check(lines.append, device=device.type, quick=True, speed=False)
    assert "FAIL  first stopped: RuntimeError: kernel launch failed" in lines
    assert "PASS  part second" in lines and "FAIL  part first" in lines


def test_gpu_check_dry_run_prints_the_plan_without_a_gpu(capsys):
    """Parts, compiles and autotune timings counted from the GPU config lists, and an estimate within budget."""
    code, out, _ = run_cli(["bench", "--gpu-check", "--dry-run"], capsys)
    assert code == 0
    names = [line.split(":")[0] for line in out.splitlines()]
    assert names == ["configs", "precisions", "edges", "large", "training", "host syncs", "speed", "trainer",
                     "total"]
    parts = gpu_check.plan("cuda")
    gather, grad = gpu_check.gpu_configs()
    assert parts[0].compiles == 2 * (4 * len(gather) + 2 * len(grad) + 1)
    assert all(p.timings > 0 for p in parts[-2:]) and all(p.timings == 0 for p in parts[:-2])  # speed, trainer
    assert sum(p.estimate_s() for p in parts) <= gpu_check.BUDGET_S
    full = gpu_check.plan("cuda", full=True)
    assert full[-2].timings == 2 * parts[-2].timings and full[-1].timings == parts[-1].timings


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_host_sync_check_passes_every_layer_but_base_and_catches_base(monkeypatch):
    """With host reads made errors (the CPU stand-in for sync debug mode), every FFN kind's layer runs its
    Triton-path forward+backward; BASE, whose auction reads the device, is caught once not excused."""
    monkeypatch.setattr(gpu_check, "host_syncs_are_errors", host_reads_are_errors)
    lines = [r.line() for r in gpu_check.host_sync_checks("cpu", quick=True)]
    assert [line for line in lines if line.startswith("FAIL")] == [], "\n".join(lines)
    assert any("base" in line and "not checked" in line for line in lines)
    monkeypatch.setattr(registered_variant("base"), "host_syncs", None)
    failed = [line for line in (r.line() for r in gpu_check.host_sync_checks("cpu", quick=True))
              if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL  base") and "host read" in failed[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(capsys):
    code, out, _ = run_cli(["bench", "--gpu-check"], capsys)
    assert code == 0 and "no CUDA GPU on this machine" in out


def test_the_trainer_part_counts_the_syncs_cuda_reports_in_batches_that_log_nothing(monkeypatch):
    """HostSyncCounter turns the sync debug mode to "warn" around each non-log batch after the warm-up, and
    names each synchronising call reported there (CUDA's warning stood in for by the same warning text)."""
    import warnings
    from types import SimpleNamespace

    modes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    counter = gpu_check.HostSyncCounter(warmup=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # outside the counted batches
        for step, logs in ((0, False), (1, False), (2, False), (3, True), (4, False)):
            trainer, module = SimpleNamespace(global_step=step), SimpleNamespace(is_log_step=lambda logs=logs: logs)
            counter.on_train_batch_start(trainer, module, None, step)
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
            counter.on_train_batch_end(trainer, module, None, None, step)
    assert counter.batches == 2 and len(counter.syncs) == 2  # steps 2 and 4: after the warm-up, not logging
    assert counter.syncs[0].startswith("test_bench.py:") and "synchronizing CUDA operation" in counter.syncs[0]
    assert modes == ["warn", "default"] * 2
