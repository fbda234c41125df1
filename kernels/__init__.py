"""Sparse expert matmuls behind one interface (installed as ``sffn_lab.kernels``).

    expert_up(x [T, D], weight [E, D, G], indices [T, K]) -> h [T, K, G]
        h[t, k] = x[t] @ weight[indices[t, k]]
    expert_down(h [T, K, G], weight [E, G, D], indices [T, K], gates [T, K] | None) -> y [T, D]
        y[t] = Σ_k gates[t, k] · h[t, k] @ weight[indices[t, k]]

Both are differentiable in every float input. The backend is Triton for CUDA tensors (when
triton is installed) and the sorted grouped PyTorch path otherwise; ``backend=`` or the
environment variable ``SFFN_KERNEL`` (``triton`` | ``torch`` | ``reference``) forces one —
``triton`` on CPU tensors runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch

from sffn_lab.kernels.reference import expert_down_reference, expert_up_reference
from sffn_lab.kernels.torch_grouped import expert_down_torch, expert_up_torch

BACKENDS = ("auto", "triton", "torch", "reference")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(x: torch.Tensor, backend: str | None) -> str:
    backend = backend or os.environ.get("SFFN_KERNEL", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown expert-matmul backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    return backend


def expert_up(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, backend: str | None = None):
    chosen = pick_backend(x, backend)
    if chosen == "triton":
        from sffn_lab.kernels.triton_ops import expert_up_triton

        return expert_up_triton(x, weight, indices)
    if chosen == "reference":
        return expert_up_reference(x, weight, indices)
    return expert_up_torch(x, weight, indices)


def expert_down(h, weight, indices, gates=None, backend: str | None = None):
    chosen = pick_backend(h, backend)
    if chosen == "triton":
        from sffn_lab.kernels.triton_ops import expert_down_triton

        return expert_down_triton(h, weight, indices, gates)
    if chosen == "reference":
        return expert_down_reference(h, weight, indices, gates)
    return expert_down_torch(h, weight, indices, gates)


__all__ = ["expert_down", "expert_up"]
