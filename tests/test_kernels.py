"""The expert matmuls (Triton, under TRITON_INTERPRET=1 without a GPU, and the PyTorch path) vs float64.

Tensors live on CUDA when there is one and on the CPU otherwise. Each case draws fresh random
inputs from the ``seed`` fixture (printed on failure; ``pytest --seed N`` replays it).
"""

from __future__ import annotations

import pytest
import torch

from sffn_lab.kernels import RoutingPlan, expert_down, expert_up, pick_backend, torch_grouped, triton_available
from sffn_lab.kernels.reference import expert_down_reference, expert_up_reference
from sffn_lab.kernels.torch_grouped import STRATEGIES, expert_down_torch, expert_up_torch

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Max error relative to the float64 result's largest magnitude (≥ 1); the float64 reference gets the same
# inputs, already rounded to the dtype. fp32: rounding over D ≤ 40 terms with IEEE products. fp16 / bf16
# accumulate in fp32 and round each product's result (h, y, the gradients) to the dtype: errors of a few
# ulp (2^-10 and 2^-7 relative). The worst errors seen over 60 seeds × these 4 shapes (CPU, both backends):
# fp32 5.1e-7, fp16 1.2e-3, bf16 1.6e-2 (2.2e-2 over 200 seeds of the autocast case); the tolerances
# leave 2–40× room above them.
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def routing(T: int, K: int, E: int, device, empty: tuple[int, ...] = ()) -> torch.Tensor:
    """Random distinct experts per token, skewed (uneven loads) and never using the ``empty`` experts."""
    weights = torch.rand(E) ** 3 + 0.01
    weights[list(empty)] = 0
    return torch.multinomial(weights.expand(T, E), K, replacement=False).to(device)


def run(backend, dtype, device, T, K, E, D, G, gated=True, empty=(1,), strategy=None):
    """Forward and every gradient of up → relu → down against float64; returns (h, y, dx, dw1, dw2, dgates).

    The gates are fp32 whatever the dtype of x and the weights, as routing gives them under mixed precision.
    """
    x = torch.randn(T, D).to(device, dtype)
    w1 = (torch.randn(E, D, G) * D**-0.5).to(device, dtype)
    w2 = (torch.randn(E, G, D) * G**-0.5).to(device, dtype)
    gates = torch.rand(T, K, device=device) if gated else None
    plan = RoutingPlan.of(routing(T, K, E, device, empty), E)
    dy = torch.randn(T, D, device=device)

    def forward_backward(fn_up, fn_down, tensors):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
        x_, w1_, w2_, g_ = leaves
        h = fn_up(x_, w1_, plan)
        y = fn_down(torch.relu(h), w2_, plan, g_)
        (y * dy.to(y.dtype)).sum().backward()
        return [h, y] + [t.grad for t in leaves if t is not None]

    if strategy is None:
        up = lambda *a: expert_up(*a, backend=backend)  # noqa: E731
        down = lambda *a: expert_down(*a, backend=backend)  # noqa: E731
    else:
        up = lambda *a: expert_up_torch(*a, strategy=strategy)  # noqa: E731
        down = lambda *a: expert_down_torch(*a, strategy=strategy)  # noqa: E731
    got = forward_backward(up, down, [x, w1, w2, gates])
    ref = forward_backward(lambda x_, w, p: expert_up_reference(x_, w, p.indices),
                           lambda h, w, p, g: expert_down_reference(h, w, p.indices, g),
                           [t.double() if t is not None else None for t in (x, w1, w2, gates)])
    errors = {}
    for name, a, b in zip(["h", "y", "dx", "dw1", "dw2", "dgates"], got, ref):
        expected_dtype = torch.float32 if name == "dgates" else dtype
        assert a.dtype == expected_dtype and a.device == b.device, f"{name}: {a.dtype} on {a.device}"
        errors[name] = float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1.0))
    assert max(errors.values()) < TOL[dtype], f"{backend} {dtype}: errors relative to max(|float64|, 1): {errors}"
    return got, errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, K, E, D, G", [(37, 2, 5, 20, 24), (50, 1, 3, 33, 17), (16, 3, 4, 40, 8)])
def test_matches_float64_reference(backend, dtype, T, K, E, D, G, device, seed, fp32_ieee):
    run(backend, dtype, device, T, K, E, D, G)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_gates_and_with_several_empty_experts(backend, dtype, device, seed, fp32_ieee):
    got, _ = run(backend, dtype, device, T=29, K=2, E=7, D=18, G=20, gated=False, empty=(0, 3, 6))
    for dw in got[3:5]:  # experts no token used get exactly zero weight gradients
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
    plan = RoutingPlan.of(routing(T, K, E, device), E)

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
    errors = [float((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0))
              for a, b in zip([y, *grads], [y_ref, *grads_ref], strict=True)]
    assert max(errors) < TOL[torch.bfloat16], f"errors of y, dx, dw1, dw2, dgates: {errors}"


def test_routing_plan_tiles_cover_every_pair_once_within_one_expert(device, seed):
    T, K, E, block_m = 45, 3, 6, 8
    plan = RoutingPlan.of(routing(T, K, E, device, empty=(2,)), E)
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
    plan = RoutingPlan.of(routing(20, 2, 4, device), 4)
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
    plan = RoutingPlan.of(routing(40, 2, 6, device), 6)
    results = [expert_up(x, w, plan, backend=b) for b in ("torch", "reference")]
    if triton_available():
        results.append(expert_up(x, w, plan, backend="triton"))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-5, rtol=1e-5)
