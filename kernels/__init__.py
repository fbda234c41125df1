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
without a GPU).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from sffn_lab.kernels.precision import KERNEL_DTYPES, autocast_operands
from sffn_lab.kernels.reference import expert_down_reference, expert_up_reference
from sffn_lab.kernels.routing_plan import RoutingPlan
from sffn_lab.kernels.torch_grouped import expert_down_torch, expert_up_torch

BACKENDS = ("auto", "triton", "torch", "reference")
log = logging.getLogger(__name__)


@functools.cache
def triton_import_error() -> str | None:
    """Why the Triton kernels cannot be imported here, or None when they can."""
    try:
        import sffn_lab.kernels.triton_ops  # noqa: F401
    except Exception as exc:  # ImportError, or a triton that fails while compiling the kernel definitions
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    return triton_import_error() is None


@functools.cache
def _say_once(message: str) -> None:
    log.warning(message)


def pick_backend(x: torch.Tensor, backend: str | None) -> str:
    """The backend that computes this input: the one asked for, or for ``auto`` Triton where it can run
    (CUDA, a dtype it takes, triton importable; said once in the log when it cannot) and torch elsewhere."""
    backend = backend or os.environ.get("SFFN_KERNEL", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown expert-matmul backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if not x.is_cuda:
        return "torch"
    if x.dtype not in KERNEL_DTYPES:
        return "torch"
    if not triton_available():
        _say_once(f"sffn-lab: the Triton expert kernels cannot be used ({triton_import_error()}); "
                  "the sparse layers run on the slower PyTorch path.")
        return "torch"
    return "triton"


def expert_up(x: torch.Tensor, weight: torch.Tensor, plan: RoutingPlan, backend: str | None = None,
              expert_order: bool = False) -> torch.Tensor:
    x, weight = autocast_operands(x, weight)
    chosen = pick_backend(x, backend)
    if torch.compiler.is_compiling() and chosen != "reference":  # one opaque op per product: no graph break
        from sffn_lab.kernels.custom_ops import expert_up_op

        return expert_up_op(x, weight, *plan.tensors(), chosen, expert_order)
    with torch.autocast(x.device.type, enabled=False):
        if chosen == "triton":
            from sffn_lab.kernels.triton_ops import expert_up_triton

            return expert_up_triton(x, weight, plan, expert_order)
        if chosen == "reference":
            h = expert_up_reference(x, weight, plan.indices)
            return h.reshape(-1, h.shape[-1])[plan.pairs] if expert_order else h
        return expert_up_torch(x, weight, plan, expert_order=expert_order)


def expert_down(
    h: torch.Tensor, weight: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor | None = None,
    backend: str | None = None, expert_order: bool = False,
) -> torch.Tensor:
    h, weight = autocast_operands(h, weight)
    chosen = pick_backend(h, backend)
    if torch.compiler.is_compiling() and chosen != "reference":
        from sffn_lab.kernels.custom_ops import expert_down_op

        return expert_down_op(h, weight, *plan.tensors(), gates, chosen, expert_order)
    with torch.autocast(h.device.type, enabled=False):
        if chosen == "triton":
            from sffn_lab.kernels.triton_ops import expert_down_triton

            return expert_down_triton(h, weight, plan, gates, expert_order)
        if chosen == "reference":
            if expert_order:  # back to pairs: row pairs[r] of the result is row r of h
                h = torch.empty_like(h).index_copy(0, plan.pairs, h).view(*plan.indices.shape, h.shape[1])
            return expert_down_reference(h, weight, plan.indices, gates)
        return expert_down_torch(h, weight, plan, gates, expert_order=expert_order)


__all__ = ["RoutingPlan", "expert_down", "expert_up"]
