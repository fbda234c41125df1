"""The expert products against float64: forward and every gradient, on skewed routing with empty experts.

Shared by the kernel tests (small shapes, CPU or CUDA) and ``sffn bench --gpu-check`` (CUDA shapes).
The float64 reference gets the same inputs already rounded to the tested dtype, so the errors are
those of the computation alone. Errors are max |got − float64| / max(|float64|, 1) per output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sffn_lab.kernels import RoutingPlan, expert_down, expert_up
from sffn_lab.kernels.reference import expert_down_reference, expert_up_reference
from sffn_lab.kernels.torch_grouped import expert_down_torch, expert_up_torch

# fp32: rounding over D terms with IEEE products (fp32 matmul precision "highest"). fp16 / bf16 accumulate
# in fp32 and round each product's result to the dtype: errors of a few ulp (2^-10 and 2^-7 relative).
# Worst errors seen over 60 seeds × the 4 test shapes (CPU, both backends): fp32 5.1e-7, fp16 1.2e-3,
# bf16 1.6e-2 (2.2e-2 over 200 seeds of the test's autocast case); these leave 2–40× room.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
OUTPUTS = ("h", "y", "dx", "dkeys", "dvalues", "dgates")


def skewed_routing(T: int, K: int, E: int, device, empty: tuple[int, ...] = ()) -> torch.Tensor:
    """[T, K] distinct experts per token, drawn with uneven loads and never using the ``empty`` experts."""
    weights = torch.rand(E) ** 3 + 0.01
    weights[list(empty)] = 0
    return torch.multinomial(weights.expand(T, E), K, replacement=False).to(device)


@dataclass
class Comparison:
    """The products' outputs and gradients (named as in OUTPUTS, dgates absent without gates) and their
    errors against float64."""

    outputs: dict[str, torch.Tensor]
    errors: dict[str, float]

    def worst(self) -> float:
        return max(self.errors.values())


def compare_with_float64(
    backend: str, dtype: torch.dtype, device, T: int, K: int, E: int, D: int, G: int, gated: bool = True,
    empty: tuple[int, ...] = (1,), strategy: str | None = None, expert_order: bool = False,
    autocast: torch.dtype | None = None, indices: torch.Tensor | None = None,
) -> Comparison:
    """up → relu → down and backward of Σ y·dy through ``backend`` (or the torch path's ``strategy``),
    with x and the weights in ``dtype`` and fp32 gates (as routing gives them under mixed precision); h
    between the products per pair or, ``expert_order``, in the plan's order (compared per pair).

    ``autocast``: the forward runs under ``torch.autocast`` in that dtype (x and the weights fp32 parameters,
    as mixed-precision training holds them; the float64 reference gets them rounded to the autocast dtype).
    ``indices`` [T, K]: this routing instead of ``skewed_routing``'s.
    """
    rounded = autocast or dtype
    x = torch.randn(T, D, device=device).to(dtype)
    keys = (torch.randn(E, D, G, device=device) * D**-0.5).to(dtype)
    values = (torch.randn(E, G, D, device=device) * G**-0.5).to(dtype)
    gates = torch.rand(T, K, device=device) if gated else None
    plan = RoutingPlan.of(skewed_routing(T, K, E, device, empty) if indices is None else indices.to(device), E)
    dy = torch.randn(T, D, device=device)

    def forward_backward(up, down, tensors, expert_order=False, autocast=None) -> dict[str, torch.Tensor]:
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
        with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
            h = up(leaves[0], leaves[1], plan)
            y = down(torch.relu(h), leaves[2], plan, leaves[3])
        (y * dy.to(y.dtype)).sum().backward()
        grads = {name: t.grad for name, t in zip(OUTPUTS[2:], leaves, strict=True) if t is not None}
        if expert_order:  # row r is pair pairs[r]
            h = torch.empty_like(h).index_copy_(0, plan.pairs, h.detach()).view(T, K, G)
        return {"h": h.detach(), "y": y.detach(), **grads}

    if strategy is not None:
        got = forward_backward(lambda *a: expert_up_torch(*a, strategy=strategy, expert_order=expert_order),
                               lambda *a: expert_down_torch(*a, strategy=strategy, expert_order=expert_order),
                               [x, keys, values, gates], expert_order, autocast)
    else:
        got = forward_backward(lambda *a: expert_up(*a, backend=backend, expert_order=expert_order),
                               lambda *a: expert_down(*a, backend=backend, expert_order=expert_order),
                               [x, keys, values, gates], expert_order, autocast)
    rounded_inputs = [t.to(rounded).double() for t in (x, keys, values)]
    ref = forward_backward(lambda a, w, p: expert_up_reference(a, w, p.indices),
                           lambda a, w, p, g: expert_down_reference(a, w, p.indices, g),
                           [*rounded_inputs, gates.double() if gates is not None else None])
    errors = {name: relative_error(got[name], ref[name]) for name in got}
    return Comparison(got, errors)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max(|want|, 1), in float64 (0 for empty tensors: T = 0 tokens)."""
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}")
    if want.numel() == 0:
        return 0.0
    want = want.double()
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0))
