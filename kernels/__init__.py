"""Sparse expert matmuls behind one interface (installed as ``sffn_lab.kernels``).

    plan = RoutingPlan.of(indices [T, K], n_experts)           once per layer, shared by both products
    expert_up(x [T, D], weight [E, D, G], plan) -> h [T, K, G]
        h[t, k] = x[t] @ weight[indices[t, k]]
    expert_down(h [T, K, G], weight [E, G, D], plan, gates [T, K] | None) -> y [T, D]
        y[t] = Σ_k gates[t, k] · h[t, k] @ weight[indices[t, k]]

With ``expert_order=True`` on both, h is [P, G] (P = T·K) in the plan's order instead, row r the pair
plan.pairs[r]: the layout the products read and write directly, so an elementwise activation between
them (the expert bank's) saves a scatter and a gather of h and of its gradient.

Both are differentiable in every float input and follow autocast as a matmul would: under
``torch.autocast`` on the input's device, x / h and the weights are cast to the autocast dtype
(their gradients flow back through the cast, so fp32 parameters get fp32 gradients) and the
result has that dtype; the gates keep their own dtype (fp32 routing).

Under ``torch.compile`` both products are ``torch.library`` custom ops (``custom_ops.py``), so a compiled
model keeps one graph through its sparse layers. The backend is Triton for CUDA tensors of a dtype the
kernels take (fp32, fp16, bf16) when triton imports, and the sorted grouped PyTorch path otherwise;
``backend=`` or the environment variable ``SFFN_KERNEL`` (``triton`` | ``torch`` | ``reference``) forces
one. ``triton`` on CPU tensors runs under ``TRITON_INTERPRET=1`` (the tests' way of checking the kernels
without a GPU). One table (``backends.py``) holds each backend's products for both paths.
"""

from __future__ import annotations

import torch

from sffn_lab.kernels.backends import BACKENDS, get_backend, pick_backend, triton_available, triton_import_error
from sffn_lab.kernels.precision import autocast_operands
from sffn_lab.kernels.routing_plan import RoutingPlan


def expert_up(x: torch.Tensor, weight: torch.Tensor, plan: RoutingPlan, backend: str | None = None,
              expert_order: bool = False) -> torch.Tensor:
    x, weight = autocast_operands(x, weight)
    name = pick_backend(x, backend)
    products = get_backend(name)
    if torch.compiler.is_compiling() and products.custom_ops:  # one opaque op per product: no graph break
        from sffn_lab.kernels.custom_ops import expert_up_op

        return expert_up_op(x, weight, plan.tensors(products.reads(x, plan.n_experts)), name, expert_order)
    with torch.autocast(x.device.type, enabled=False):
        return products.up(x, weight, plan, expert_order)


def expert_down(
    h: torch.Tensor, weight: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor | None = None,
    backend: str | None = None, expert_order: bool = False,
) -> torch.Tensor:
    h, weight = autocast_operands(h, weight)
    name = pick_backend(h, backend)
    products = get_backend(name)
    if torch.compiler.is_compiling() and products.custom_ops:
        from sffn_lab.kernels.custom_ops import expert_down_op

        return expert_down_op(h, weight, plan.tensors(products.reads(h, plan.n_experts)), gates, name,
                              expert_order)
    with torch.autocast(h.device.type, enabled=False):
        return products.down(h, weight, plan, gates, expert_order)


__all__ = ["BACKENDS", "RoutingPlan", "expert_down", "expert_up", "pick_backend", "triton_available",
           "triton_import_error"]
