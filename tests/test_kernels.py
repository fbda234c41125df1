"""The expert matmuls (Triton, under TRITON_INTERPRET=1 without a GPU, and the PyTorch path) vs float64.

Tensors live on CUDA when there is one and on the CPU otherwise. Each case draws fresh random
inputs from the ``seed`` fixture (printed on failure; ``pytest --seed N`` replays it).
"""

from __future__ import annotations

import pytest
import torch

from sffn_lab.bench.accuracy import TOLERANCE, compare_with_float64, relative_error, skewed_routing
from sffn_lab.kernels import (
    RoutingPlan,
    expert_down,
    expert_up,
    pick_backend,
    torch_grouped,
    triton_available,
)
from sffn_lab.kernels.torch_grouped import STRATEGIES

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run(backend, dtype, device, T, K, E, D, G, gated=True, empty=(1,), strategy=None) -> dict[str, torch.Tensor]:
    """Forward and every gradient against float64 within TOLERANCE[dtype]; returns the outputs by name."""
    result = compare_with_float64(backend, dtype, device, T, K, E, D, G, gated, empty, strategy)
    for name, value in result.outputs.items():
        expected_dtype = torch.float32 if name == "dgates" else dtype
        assert value.dtype == expected_dtype and value.device.type == device.type, f"{name}: {value.dtype}"
    assert result.worst() < TOLERANCE[dtype], (
        f"{backend} {dtype}: errors relative to max(|float64|, 1): {result.errors}"
    )
    return result.outputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, K, E, D, G", [(37, 2, 5, 20, 24), (50, 1, 3, 33, 17), (16, 3, 4, 40, 8)])
def test_matches_float64_reference(backend, dtype, T, K, E, D, G, device, seed, fp32_ieee):
    run(backend, dtype, device, T, K, E, D, G)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_gates_and_with_several_empty_experts(backend, dtype, device, seed, fp32_ieee):
    got = run(backend, dtype, device, T=29, K=2, E=7, D=18, G=20, gated=False, empty=(0, 3, 6))
    for dw in (got["dkeys"], got["dvalues"]):  # experts no token used get exactly zero weight gradients
        assert dw[[0, 3, 6]].abs().sum() == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("grouped_mm", [True, False])
def test_torch_path_strategies_with_and_without_grouped_mm(strategy, grouped_mm, device, seed, fp32_ieee, monkeypatch):
    if grouped_mm:
        probe = torch.empty(8, 20, device=device), torch.empty(3, 20, 24, device=device)
        if not torch_grouped.use_grouped_mm(*probe):
            pytest.skip(f"torch._grouped_mm does not take fp32 {device.type} tensors in this torch")
    else:
        monkeypatch.setattr(torch_grouped, "use_grouped_mm", lambda *tensors: False)
    run("torch", torch.float32, device, T=37, K=2, E=5, D=20, G=24, empty=(1, 3), strategy=strategy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_computes_in_its_dtype_and_gives_fp32_parameters_fp32_gradients(backend, device, seed):
    """Under autocast the products take the autocast dtype as a matmul would; the gradients of fp32 leaves
    are fp32 and match float64 within the bf16 tolerance."""
    T, K, E, D, G = 33, 2, 4, 24, 16
    leaves = [torch.randn(T, D, device=device), torch.randn(E, D, G, device=device) * D**-0.5,
              torch.randn(E, G, D, device=device) * G**-0.5, torch.rand(T, K, device=device)]
    plan = RoutingPlan.of(skewed_routing(T, K, E, device), E)

    def forward_backward(tensors, backend, autocast):
        tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
        x, w1, w2, g = tensors
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = expert_down(torch.relu(expert_up(x, w1, plan, backend)), w2, plan, g, backend)
        y.float().square().sum().backward()
        return y.detach(), [t.grad for t in tensors]

    y, grads = forward_backward(leaves, backend, autocast=True)
    # the reference gets x and the weights as autocast rounds them (bf16), the gates exact (they stay fp32)
    rounded = [t.bfloat16().double() for t in leaves[:3]] + [leaves[3].double()]
    y_ref, grads_ref = forward_backward(rounded, "reference", autocast=False)
    assert y.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads)
    errors = [relative_error(a, b) for a, b in zip([y, *grads], [y_ref, *grads_ref], strict=True)]
    assert max(errors) < TOLERANCE[torch.bfloat16], f"errors of y, dx, dw1, dw2, dgates: {errors}"


def test_routing_plan_tiles_cover_every_pair_once_within_one_expert(device, seed):
    T, K, E, block_m = 45, 3, 6, 8
    plan = RoutingPlan.of(skewed_routing(T, K, E, device, empty=(2,)), E)
    tiles = plan.tiles(block_m)
    assert len(tiles) == -(-T * K // block_m) + E  # fixed by the shapes: no host sync to size a grid
    covered = torch.zeros(T * K, dtype=torch.long)
    for e, start, end in zip(tiles.expert.tolist(), tiles.start.tolist(), tiles.end.tolist(), strict=True):
        if start < end:
            assert plan.offsets[e] <= start and end == plan.offsets[e + 1]  # never straddles two experts
            covered[start : min(start + block_m, end)] += 1
    assert covered.eq(1).all()
    assert plan.indices.reshape(-1)[plan.pairs].diff().ge(0).all()  # pairs in expert order


def test_routing_plan_tensors_live_on_the_routing_device(device, seed):
    plan = RoutingPlan.of(skewed_routing(20, 2, 4, device), 4)
    tiles = plan.tiles(16)
    for t in (plan.pairs, plan.tokens, plan.counts, plan.offsets, plan.group_ends(), tiles.expert, tiles.start):
        assert t.device == device


def test_auto_backend_picks_only_what_can_run_the_input():
    cpu = torch.empty(2, 2)
    assert pick_backend(cpu, None) == "torch"
    assert pick_backend(cpu.double(), None) == "torch"
    assert pick_backend(cpu, "triton") == "triton"  # forced: the interpreter runs it on the CPU
    if torch.cuda.is_available():
        assert pick_backend(cpu.cuda().double(), None) == "torch"  # the kernels take fp32 / fp16 / bf16 only
        assert pick_backend(cpu.cuda(), None) == ("triton" if triton_available() else "torch")
    with pytest.raises(ValueError, match="unknown expert-matmul backend"):
        pick_backend(cpu, "cutlass")


def test_backends_agree_with_each_other(device, seed, fp32_ieee):
    x, w = torch.randn(40, 16, device=device), torch.randn(6, 16, 12, device=device)
    plan = RoutingPlan.of(skewed_routing(40, 2, 6, device), 6)
    results = [expert_up(x, w, plan, backend=b) for b in ("torch", "reference")]
    if triton_available():
        results.append(expert_up(x, w, plan, backend="triton"))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_weight_view_gives_the_contiguous_weights_results(backend, device, seed, fp32_ieee):
    """sMLP's routed token mixing passes a transposed slice of its mixing matrices as the weight [E, D, G]."""
    full = torch.randn(4, 20, 16, device=device, requires_grad=True)
    contiguous = full.detach()[:, 5:].transpose(1, 2).contiguous().requires_grad_(True)  # [4, 16, 15]
    x1 = torch.randn(30, 16, device=device, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    plan = RoutingPlan.of(skewed_routing(30, 1, 4, device), 4)
    y1 = expert_up(x1, full[:, 5:].transpose(1, 2), plan, backend=backend)  # a strided view
    y2 = expert_up(x2, contiguous, plan, backend="reference")
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.grad[:, 5:].transpose(1, 2), contiguous.grad, atol=1e-5, rtol=1e-5)
    assert full.grad[:, :5].abs().sum() == 0  # rows outside the slice get no gradient
