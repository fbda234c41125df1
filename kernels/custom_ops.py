"""The expert products as ``torch.library`` custom ops, the form ``torch.compile`` traces them in.

Dynamo cannot look inside the products (per-expert Python loops on the PyTorch path, Triton launches on
the GPU path): it would break the graph around every sparse layer. As custom ops they are opaque nodes
with a fake implementation (the output's shape and dtype) and an autograd formula that calls the backward
op, so a compiled model keeps one graph through its sparse layers. The dispatcher in ``kernels/__init__.py``
takes this route only while compiling; eager code calls the backends' autograd functions directly.

The routing plan crosses each op's boundary as a list of tensors (``RoutingPlan.tensors``): its own, then what
the backend's products read of it (``PlanReads``: Triton's tile tables and sorted-row index, the PyTorch
path's offsets on the host), derived once in the compiled graph, so the four ops of a layer (both products,
both backward passes) share one derivation, as eager calls share one plan object. Each op asks the
backend what the list holds (``Backend.reads`` of the same operand: the answer the dispatcher got). What
stays per op: the Triton weight gradient's row spans
(``triton_ops.weight_grad``, a few small tensor ops in each backward op).

Shapes: T tokens, K experts per token, E experts, D model width, G expert width.
"""

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from sffn_lab.kernels.backends import get_backend
from sffn_lab.kernels.routing_plan import RoutingPlan


def _plan(tensors: list[Tensor], backend: str, operand: Tensor) -> RoutingPlan:
    """The plan the dispatcher sent for this backend and operand (x of the up product, h of the down one)."""
    n_experts = tensors[3].shape[0]  # counts [E]
    return RoutingPlan.from_tensors(tensors, get_backend(backend).reads(operand, n_experts))


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """A custom op returns tensors only: an unneeded gradient travels as an empty one."""
    return t if t is not None else like.new_empty(0)


@torch.library.custom_op("sffn::expert_up", mutates_args=())
def expert_up_op(x: Tensor, weight: Tensor, plan: list[Tensor], backend: str, expert_order: bool) -> Tensor:
    """x [T, D], weight [E, D, G] → h [T, K, G] (or [P, G] in expert order)."""
    with torch.autocast(x.device.type, enabled=False):
        return get_backend(backend).up_forward(x, weight, _plan(plan, backend, x), expert_order)


@expert_up_op.register_fake
def _(x, weight, plan, backend, expert_order):
    T, K = plan[0].shape
    return x.new_empty(T * K, weight.shape[2]) if expert_order else x.new_empty(T, K, weight.shape[2])


@torch.library.custom_op("sffn::expert_up_backward", mutates_args=())
def expert_up_backward_op(grad_h: Tensor, x: Tensor, weight: Tensor, plan: list[Tensor], backend: str,
                          expert_order: bool, need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    """grad_h shaped as h → (dL/dx [T, D], dL/dW [E, D, G]); an unneeded one is empty."""
    with torch.autocast(x.device.type, enabled=False):
        grad_x, grad_w = get_backend(backend).up_grads(grad_h, x, weight, _plan(plan, backend, x), expert_order,
                                                       need_x, need_w)
    return _or_empty(grad_x, x), _or_empty(grad_w, weight)


@expert_up_backward_op.register_fake
def _(grad_h, x, weight, plan, backend, expert_order, need_x, need_w):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0))


def _up_setup(ctx, inputs, output) -> None:
    x, weight, plan, backend, expert_order = inputs
    ctx.save_for_backward(x, weight, *plan)
    ctx.backend, ctx.expert_order = backend, expert_order


def _up_backward(ctx, grad_h):
    x, weight, *plan = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    grad_x, grad_w = expert_up_backward_op(grad_h, x, weight, plan, ctx.backend, ctx.expert_order, need_x, need_w)
    return (grad_x if need_x else None, grad_w if need_w else None, [None] * len(plan), None, None)


expert_up_op.register_autograd(_up_backward, setup_context=_up_setup)


@torch.library.custom_op("sffn::expert_down", mutates_args=())
def expert_down_op(h: Tensor, weight: Tensor, plan: list[Tensor], gates: Tensor | None, backend: str,
                   expert_order: bool) -> Tensor:
    """h [T, K, G] (or [P, G] in expert order), weight [E, G, D], gates [T, K] or None → y [T, D]."""
    with torch.autocast(h.device.type, enabled=False):
        return get_backend(backend).down_forward(h, weight, _plan(plan, backend, h), gates, expert_order)


@expert_down_op.register_fake
def _(h, weight, plan, gates, backend, expert_order):
    return h.new_empty(plan[0].shape[0], weight.shape[2])


@torch.library.custom_op("sffn::expert_down_backward", mutates_args=())
def expert_down_backward_op(grad_y: Tensor, h: Tensor, weight: Tensor, plan: list[Tensor], gates: Tensor | None,
                            backend: str, expert_order: bool, need_h: bool, need_w: bool,
                            need_gates: bool) -> tuple[Tensor, Tensor, Tensor]:
    """grad_y [T, D] → (dL/dh shaped as h, dL/dW [E, G, D], dL/dg [T, K]); an unneeded one is empty."""
    with torch.autocast(h.device.type, enabled=False):
        grad_h, grad_w, grad_gates = get_backend(backend).down_grads(
            grad_y, h, weight, _plan(plan, backend, h), gates, expert_order, need_h, need_w, need_gates)
    return _or_empty(grad_h, h), _or_empty(grad_w, weight), _or_empty(grad_gates, h)


@expert_down_backward_op.register_fake
def _(grad_y, h, weight, plan, gates, backend, expert_order, need_h, need_w, need_gates):
    grad_gates = torch.empty_like(gates) if gates is not None and need_gates else h.new_empty(0)
    return (torch.empty_like(h) if need_h else h.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0), grad_gates)


def _down_setup(ctx, inputs, output) -> None:
    h, weight, plan, gates, backend, expert_order = inputs
    ctx.save_for_backward(h, weight, gates, *plan)
    ctx.backend, ctx.expert_order = backend, expert_order


def _down_backward(ctx, grad_y):
    h, weight, gates, *plan = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_h, grad_w, grad_gates = expert_down_backward_op(grad_y, h, weight, plan, gates, ctx.backend,
                                                         ctx.expert_order, need[0], need[1], need[3])
    return (grad_h if need[0] else None, grad_w if need[1] else None, [None] * len(plan),
            grad_gates if need[3] and gates is not None else None, None, None)


expert_down_op.register_autograd(_down_backward, setup_context=_down_setup)


# FLOP formulas for torch.utils.flop_counter.FlopCounterMode, which sees a custom op and not its body: the
# products each op computes, P = T·K routed pairs of D × G (multiply-add = 2), from the shapes alone (the
# plan's first tensor is the indices [T, K]). A gradient costs one such product; the gate gradient takes the
# per-pair outputs (one product) and their dot products with dL/dy (2·P·D).
def _pairs(plan_shapes) -> int:
    T, K = plan_shapes[0]
    return T * K


@register_flop_formula(torch.ops.sffn.expert_up)
def _(x_shape, weight_shape, plan_shapes, *args, **kwargs) -> int:
    return 2 * _pairs(plan_shapes) * weight_shape[1] * weight_shape[2]


@register_flop_formula(torch.ops.sffn.expert_down)
def _(h_shape, weight_shape, plan_shapes, *args, **kwargs) -> int:
    return 2 * _pairs(plan_shapes) * weight_shape[1] * weight_shape[2]


@register_flop_formula(torch.ops.sffn.expert_up_backward)
def _(grad_shape, x_shape, weight_shape, plan_shapes, backend, expert_order, need_x, need_w, **kwargs) -> int:
    return (need_x + need_w) * 2 * _pairs(plan_shapes) * weight_shape[1] * weight_shape[2]


@register_flop_formula(torch.ops.sffn.expert_down_backward)
def _(grad_shape, h_shape, weight_shape, plan_shapes, gates_shape, backend, expert_order, need_h, need_w,
      need_gates, **kwargs) -> int:
    P, G, D = _pairs(plan_shapes), weight_shape[1], weight_shape[2]
    gates = need_gates and gates_shape is not None
    return (need_h + need_w + gates) * 2 * P * G * D + gates * 2 * P * D
