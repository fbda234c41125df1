"""The expert-product backends in one table, for the eager and the compiled paths alike.

``pick_backend`` names the backend that computes an input: the one asked for (``backend=`` or the
environment variable ``SFFN_KERNEL``), or for ``auto`` Triton where it can run (CUDA, a dtype the kernels
take, triton importable) and the PyTorch path elsewhere. ``get_backend(name)`` gives that backend's products:
the differentiable ones eager code calls, the plain forward and backward functions the ``torch.compile``
custom ops call (``custom_ops.py``), and what of the routing plan those read (``PlanReads``), which a
compiled layer derives once in its graph and hands to all four ops.

Shapes: T tokens, K experts per token, P = T·K pairs, E experts, D model width, G expert width.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sffn_lab.kernels import torch_grouped
from sffn_lab.kernels.precision import KERNEL_DTYPES
from sffn_lab.kernels.reference import expert_down_reference, expert_up_reference
from sffn_lab.kernels.routing_plan import PlanReads, RoutingPlan

BACKENDS = ("auto", "triton", "torch", "reference")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """One backend's expert products.

    Differentiable, for eager code: ``up(x [T, D], W [E, D, G], plan, expert_order) → h [T, K, G]`` (or [P, G] in
    expert order) and ``down(h, W [E, G, D], plan, gates [T, K] | None, expert_order) → y [T, D]``. Without
    autograd, for the custom ops (None: the backend is traced as plain PyTorch instead):
    ``up_forward`` / ``down_forward`` with the same arguments, ``up_grads(grad_h, x, W, plan, expert_order,
    need_x, need_w) → (dx | None, dW | None)``, ``down_grads(grad_y, h, W, plan, gates, expert_order, need_h,
    need_w, need_gates) → (dh, dW, dgates)``, each None where not needed; ``reads(operand, E)``: what those
    read of the plan beyond its tensors.
    """

    up: Callable
    down: Callable
    up_forward: Callable | None = None
    up_grads: Callable | None = None
    down_forward: Callable | None = None
    down_grads: Callable | None = None
    reads: Callable[[torch.Tensor, int], PlanReads] | None = None

    @property
    def custom_ops(self) -> bool:
        """Whether ``torch.compile`` runs this backend as the opaque custom ops of ``custom_ops.py``."""
        return self.up_forward is not None


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


@contextmanager
def forced_backend(backend: str) -> Iterator[None]:
    """Inside the block, ``auto`` means ``backend`` (``SFFN_KERNEL`` set, and put back after)."""
    before = os.environ.get("SFFN_KERNEL")
    os.environ["SFFN_KERNEL"] = backend
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SFFN_KERNEL")
        else:
            os.environ["SFFN_KERNEL"] = before


def pick_backend(x: torch.Tensor, backend: str | None) -> str:
    """The backend that computes this input: the one asked for, or for ``auto`` Triton where it can run
    (CUDA, a dtype it takes, triton importable; said once in the log when it cannot) and torch elsewhere."""
    backend = backend or os.environ.get("SFFN_KERNEL", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown expert-matmul backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if not x.is_cuda or x.dtype not in KERNEL_DTYPES:
        return "torch"
    if not triton_available():
        _say_once(f"sffn-lab: the Triton expert kernels cannot be used ({triton_import_error()}); "
                  "the sparse layers run on the slower PyTorch path.")
        return "torch"
    return "triton"


def _torch() -> Backend:
    return Backend(
        up=lambda x, weight, plan, expert_order: torch_grouped.expert_up_torch(x, weight, plan,
                                                                               expert_order=expert_order),
        down=lambda h, weight, plan, gates, expert_order: torch_grouped.expert_down_torch(
            h, weight, plan, gates, expert_order=expert_order),
        up_forward=torch_grouped.up_forward,
        up_grads=torch_grouped.up_backward,
        down_forward=torch_grouped.down_forward,
        down_grads=torch_grouped.down_backward,
        reads=torch_grouped.plan_reads,
    )


def _triton() -> Backend:
    from sffn_lab.kernels import triton_ops
    from sffn_lab.kernels.triton_gather_matmul import TILE_HEIGHTS

    def down_forward(h, weight, plan, gates, expert_order):
        return triton_ops.down_forward(h, weight, plan, triton_ops.sorted_gates(gates, plan), expert_order)

    def down_grads(grad_y, h, weight, plan, gates, expert_order, need_h, need_w, need_gates):
        return triton_ops.down_backward(grad_y, h, weight, plan, gates, triton_ops.sorted_gates(gates, plan),
                                        expert_order, need_h, need_w, need_gates)

    return Backend(
        up=triton_ops.expert_up_triton,
        down=triton_ops.expert_down_triton,
        up_forward=triton_ops.up_forward,
        up_grads=triton_ops.up_backward,
        down_forward=down_forward,
        down_grads=down_grads,
        reads=lambda operand, n_experts: PlanReads(tile_heights=TILE_HEIGHTS),
    )


def _reference_up(x, weight, plan: RoutingPlan, expert_order: bool) -> torch.Tensor:
    h = expert_up_reference(x, weight, plan.indices)
    return h.reshape(-1, h.shape[-1])[plan.pairs] if expert_order else h


def _reference_down(h, weight, plan: RoutingPlan, gates, expert_order: bool) -> torch.Tensor:
    if expert_order:  # back to pairs: row pairs[r] of the result is row r of h
        h = torch.empty_like(h).index_copy(0, plan.pairs, h).view(*plan.indices.shape, h.shape[1])
    return expert_down_reference(h, weight, plan.indices, gates)


BUILDERS: dict[str, Callable[[], Backend]] = {
    "torch": _torch,
    "triton": _triton,
    "reference": lambda: Backend(up=_reference_up, down=_reference_down),  # plain PyTorch: traced as it is
}


@functools.cache
def get_backend(name: str) -> Backend:
    """The named backend's products (Triton's imported on first use)."""
    return BUILDERS[name]()
