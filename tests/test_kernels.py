"""The expert matmuls (Triton under TRITON_INTERPRET=1 on the CPU, and the PyTorch path) vs float64."""

from __future__ import annotations

import pytest
import torch
from sffn_lab.kernels import expert_down, expert_up, torch_grouped, triton_available
from sffn_lab.kernels.reference import expert_down_reference, expert_up_reference
from sffn_lab.kernels.torch_grouped import STRATEGIES, expert_down_torch, expert_up_torch

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]
# fp32 kernels against a float64 reference of the same inputs: errors are fp32 rounding over D ≤ 40 terms
TOL = {torch.float32: 2e-5, torch.float16: 2e-2}


def routing(T: int, K: int, E: int, empty: tuple[int, ...] = ()) -> torch.Tensor:
    """Random distinct experts per token, skewed (uneven loads) and never using the ``empty`` experts."""
    weights = torch.rand(E) ** 3 + 0.01
    weights[list(empty)] = 0
    return torch.multinomial(weights.expand(T, E), K, replacement=False)


def run(backend, dtype, T, K, E, D, G, gated=True, empty=(1,), strategy=None):
    x = torch.randn(T, D, dtype=dtype)
    w1 = torch.randn(E, D, G, dtype=dtype) * D**-0.5
    w2 = torch.randn(E, G, D, dtype=dtype) * G**-0.5
    gates = torch.rand(T, K, dtype=dtype) if gated else None
    idx = routing(T, K, E, empty)
    dy = torch.randn(T, D, dtype=dtype)

    def forward_backward(fn_up, fn_down, tensors):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
        x_, w1_, w2_, g_ = leaves
        h = fn_up(x_, w1_, idx)
        y = fn_down(torch.relu(h), w2_, idx, g_)
        (y * (dy if y.dtype == dy.dtype else dy.to(y.dtype))).sum().backward()
        return [h, y] + [t.grad for t in leaves if t is not None]

    if strategy is None:
        up = lambda *a: expert_up(*a, backend=backend)  # noqa: E731
        down = lambda *a: expert_down(*a, backend=backend)  # noqa: E731
    else:
        up = lambda *a: expert_up_torch(*a, strategy=strategy)  # noqa: E731
        down = lambda *a: expert_down_torch(*a, strategy=strategy)  # noqa: E731
    got = forward_backward(up, down, [x, w1, w2, gates])
    ref = forward_backward(expert_up_reference, expert_down_reference,
                           [t.double() if t is not None else None for t in (x, w1, w2, gates)])
    names = ["h", "y", "dx", "dw1", "dw2", "dgates"]
    for name, a, b in zip(names, got, ref):
        scale = b.abs().max().clamp_min(1.0)
        err = float((a.double() - b).abs().max() / scale)
        assert err < TOL[dtype], f"{backend} {name}: max error {err:.2e} relative to {float(scale):.2f}"
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, K, E, D, G", [(37, 2, 5, 20, 24), (50, 1, 3, 33, 17), (16, 3, 4, 40, 8)])
def test_matches_float64_reference(backend, T, K, E, D, G):
    run(backend, torch.float32, T, K, E, D, G)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_gates_and_with_several_empty_experts(backend):
    run(backend, torch.float32, T=29, K=2, E=7, D=18, G=20, gated=False, empty=(0, 3, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_inputs_accumulate_in_fp32(backend):
    if backend == "torch":
        pytest.skip("the PyTorch path computes in the input dtype with PyTorch's own matmuls")
    run(backend, torch.float16, T=24, K=2, E=4, D=32, G=32)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("grouped_mm", [True, False])
def test_torch_path_strategies_with_and_without_grouped_mm(strategy, grouped_mm, monkeypatch):
    if grouped_mm:
        probe = torch.empty(8, 20), torch.empty(3, 20, 24)
        if not torch_grouped.use_grouped_mm(*probe):
            pytest.skip("torch._grouped_mm is not available for fp32 CPU tensors in this torch")
    else:
        monkeypatch.setattr(torch_grouped, "use_grouped_mm", lambda *tensors: False)
    run("torch", torch.float32, T=37, K=2, E=5, D=20, G=24, empty=(1, 3), strategy=strategy)


def test_dead_experts_get_zero_weight_gradient():
    got = run("torch", torch.float32, T=20, K=2, E=5, D=8, G=8, empty=(2,))
    assert got[3][2].abs().sum() == 0 and got[4][2].abs().sum() == 0


def test_backends_agree_with_each_other():
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    x, w = torch.randn(40, 16), torch.randn(6, 16, 12)
    idx = routing(40, 2, 6)
    results = [expert_up(x, w, idx, backend=b) for b in ("torch", "reference")]
    if triton_available():
        results.append(expert_up(x, w, idx, backend="triton"))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-5, rtol=1e-5)
