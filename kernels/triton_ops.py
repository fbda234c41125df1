"""Autograd wrappers of the Triton expert matmuls (the CUDA path; testable on CPU with TRITON_INTERPRET=1).

Precision policy: every kernel accumulates in fp32 and writes the input dtype. fp16 / bf16 inputs
use the tensor cores' native products; fp32 inputs follow ``torch.get_float32_matmul_precision()``
as cuBLAS matmuls do ("highest": IEEE fp32 products, "high" / "medium": TF32). The gates (fp32
routing under mixed precision) are read as fp32 and their gradient keeps their dtype. The K outputs
of a token are written to a [T·K, D] buffer and summed in PyTorch rather than with atomic adds, and a
weight gradient's spans of one expert are summed in order by a second kernel, so results are deterministic.

Kernels launch under the input's CUDA device, on grids whose size depends on the shapes only (the
plan's tile bounds), so no launch waits for the host. h between the products is per pair or, with
``expert_order``, in the plan's order: the kernels then read and write its rows through the identity
index ``plan.sorted_rows()`` instead of ``plan.pairs``.

Shapes: T tokens, K experts per token, P = T·K pairs, E experts, D model width, G expert width.
"""

from __future__ import annotations

import functools

import torch
import triton

from sffn_lab.kernels.precision import KERNEL_DTYPES, autocast_off
from sffn_lab.kernels.routing_plan import RoutingPlan
from sffn_lab.kernels.triton_gather_matmul import INTERPRETED, TILE_HEIGHTS, gather_matmul_kernel
from sffn_lab.kernels.triton_weight_grad import sum_spans_kernel, weight_grad_kernel

MIN_SPAN_ROWS = 256  # the shortest span of rows one weight-gradient program sums on a GPU
SUM_BLOCK = 1024  # elements per program of the span sums


def _check(name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _product_flags(dtype: torch.dtype) -> dict[str, bool]:
    """IEEE: fp32 products without TF32; UPCAST: bf16 tiles to fp32 before ``tl.dot`` (the interpreter's
    bf16 dot is wrong, its bf16 loads are right)."""
    return {
        "IEEE": dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest",
        "UPCAST": INTERPRETED and dtype == torch.bfloat16,
    }


def _rows_hint(rows: int) -> int:
    """Mean rows per expert or span as a power of two: an autotune key that stays put as T varies a little."""
    return triton.next_power_of_2(max(rows, 1))


def gather_matmul(a, weight, src, dst, plan: RoutingPlan, transpose_w: bool = False, scale=None):
    """out[dst[r]] = scale[r] · a[src[r]] @ W[e(r)] (W[e]ᵀ if transpose_w) over the P sorted rows r → [P, N].

    ``scale`` (optional) is indexed by the sorted row r, like ``src`` and ``dst``; ``dst`` is a
    permutation of the P output rows, so every one is written.
    """
    _check("a", a, 2)
    _check("weight", weight, 3)
    if a.dtype != weight.dtype:
        raise TypeError(f"a and weight must share a dtype, got {a.dtype} and {weight.dtype}")
    K_in, N = (weight.shape[2], weight.shape[1]) if transpose_w else (weight.shape[1], weight.shape[2])
    if a.shape[1] != K_in:
        raise ValueError(f"a has {a.shape[1]} columns but the expert weights expect {K_in}")
    stride_wk, stride_wn = (weight.stride(2), weight.stride(1)) if transpose_w else (weight.stride(1), weight.stride(2))
    out = a.new_empty(dst.shape[0], N)
    small, large = (plan.tiles(height) for height in TILE_HEIGHTS)

    def grid(meta):
        tiles = large if meta["BLOCK_M"] == large.height else small
        return (len(tiles) * triton.cdiv(N, meta["BLOCK_N"]),)

    with torch.cuda.device_of(a):
        gather_matmul_kernel[grid](
            a, weight, out, src, dst, scale if scale is not None else out,
            small.table, len(small), large.table, len(large),
            N, K_in, _rows_hint(dst.shape[0] // plan.n_experts),
            a.stride(0), a.stride(1),
            weight.stride(0), stride_wk, stride_wn,
            out.stride(0), out.stride(1),
            HAS_SCALE=scale is not None, LARGE_M=large.height, **_product_flags(a.dtype),
        )
    return out


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


SPAN_MEAN_ROWS = 4  # an expert with up to this many times the mean rows per expert keeps one weight-gradient span


def rows_per_span(P: int, E: int, d_in: int, J: int, device: torch.device) -> int:
    """The most rows one weight-gradient program sums: each expert's rows are cut into spans of this many.

    On CUDA, SPAN_MEAN_ROWS times the mean rows per expert (a power of two, at least MIN_SPAN_ROWS): balanced
    experts keep one span each and write dW directly, and a much busier expert is cut, so the slowest program
    walks no more rows than that whatever the routing (the shapes alone decide: no host sync). When the experts
    would give fewer than four programs per multiprocessor at the largest blocks (E · ⌈I/128⌉ · ⌈J/128⌉), the
    spans are shortened to reach that. Off CUDA (the interpreter runs programs one by one): every expert one span.
    """
    if device.type != "cuda":
        return max(P, 1)
    rows = SPAN_MEAN_ROWS * triton.next_power_of_2(max(triton.cdiv(P, E), 1))
    wanted = 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    programs = E * triton.cdiv(d_in, 128) * triton.cdiv(J, 128)
    if programs < wanted:
        rows = min(rows, triton.next_power_of_2(max(triton.cdiv(P, E * triton.cdiv(wanted, programs)), 1)))
    return max(MIN_SPAN_ROWS, rows)


def weight_grad(a, b, src_a, src_b, plan: RoutingPlan, shape, scale=None, span_rows: int | None = None):
    """dW[e] = Σ_{r of e} a[src_a[r]]ᵀ (scale[r] · b[src_b[r]]) → [E, I, J] (fp32 sums, a's dtype).

    ``span_rows``: cut each expert's rows into spans of at most that many (None: ``rows_per_span``'s choice);
    an expert of several spans gets its fp32 partial sums added in span order.
    """
    E, d_in, J = shape
    P = src_a.shape[0]
    if span_rows is None:
        span_rows = rows_per_span(P, E, d_in, J, a.device)
    spans = plan.tiles(span_rows)
    grad = torch.empty(shape, dtype=a.dtype, device=a.device)  # written by single spans and by the span sums
    # partial sums only where an expert can have several spans (allocated, touched only for those spans)
    partial = grad if span_rows >= P else torch.empty((len(spans), d_in, J), dtype=torch.float32, device=a.device)

    def grid(meta):
        return (triton.cdiv(d_in, meta["BLOCK_I"]) * triton.cdiv(J, meta["BLOCK_J"]) * len(spans),)

    with torch.cuda.device_of(a):
        weight_grad_kernel[grid](
            a, b, grad, partial, src_a, src_b, scale if scale is not None else grad, spans.table, spans.first,
            len(spans), spans.height, d_in, J, _rows_hint(min(spans.height, P // E)),
            a.stride(0), a.stride(1),
            b.stride(0), b.stride(1),
            grad.stride(0), grad.stride(1), grad.stride(2),
            HAS_SCALE=scale is not None, **_product_flags(a.dtype),
        )
        sum_spans_kernel[(triton.cdiv(d_in * J, SUM_BLOCK), E)](partial, grad, spans.first, d_in * J, BLOCK=SUM_BLOCK)
    return grad


def hidden_rows(plan: RoutingPlan, expert_order: bool) -> torch.Tensor:
    """Where sorted pair r's row of h lives: row r itself in expert order, else row pairs[r] (long [P])."""
    return plan.sorted_rows() if expert_order else plan.pairs


def up_forward(x, weight, plan: RoutingPlan, expert_order: bool) -> torch.Tensor:
    """h[t, k] = x[t] @ W[indices[t, k]];  x [T, D], W [E, D, G] → h [T, K, G], or [P, G] in expert order."""
    T, K = plan.indices.shape
    h = gather_matmul(x.contiguous(), weight, plan.tokens, hidden_rows(plan, expert_order), plan)
    return h if expert_order else h.view(T, K, h.shape[1])  # sizes spelt out: -1 is ambiguous when T = 0


def up_backward(grad_h, x, weight, plan: RoutingPlan, expert_order: bool, need_x: bool, need_w: bool):
    """grad_h shaped as h → (dL/dx [T, D] or None, dL/dW [E, D, G] or None)."""
    x = x.contiguous()
    T = x.shape[0]
    grad_h = grad_h.reshape(-1, grad_h.shape[-1]).contiguous()
    hidden = hidden_rows(plan, expert_order)
    grad_x = grad_w = None
    if need_x:
        per_pair = gather_matmul(grad_h, weight, hidden, plan.pairs, plan, transpose_w=True)
        grad_x = per_pair.view(T, plan.indices.shape[1], x.shape[1]).sum(1)  # pair p = t·K + k
    if need_w:
        grad_w = weight_grad(x, grad_h, plan.tokens, hidden, plan, weight.shape)
    return grad_x, grad_w


def sorted_gates(gates, plan: RoutingPlan):
    """gates [T, K] → [P] in the plan's (expert) order, the order the kernels scale rows in; None stays None."""
    return gates.reshape(-1)[plan.pairs].contiguous() if gates is not None else None


def down_forward(h, weight, plan: RoutingPlan, gates_sorted, expert_order: bool) -> torch.Tensor:
    """y[t] = Σ_k g[t, k] · h[t, k] @ W[indices[t, k]];  h [T, K, G] (or [P, G] in expert order), W [E, G, D],
    ``sorted_gates(g)`` → y [T, D]."""
    T, K = plan.indices.shape
    rows = h.reshape(T * K, h.shape[-1]).contiguous()
    per_pair = gather_matmul(rows, weight, hidden_rows(plan, expert_order), plan.pairs, plan, scale=gates_sorted)
    return per_pair.view(T, K, per_pair.shape[1]).sum(1)


def down_backward(grad_y, h, weight, plan: RoutingPlan, gates, gates_sorted, expert_order: bool, need_h: bool,
                  need_w: bool, need_gates: bool):
    """grad_y [T, D] → (dL/dh shaped as h, dL/dW [E, G, D], dL/dg [T, K]), each None where not needed."""
    rows = h.reshape(-1, h.shape[-1]).contiguous()
    hidden = hidden_rows(plan, expert_order)
    ungated = gather_matmul(grad_y.contiguous(), weight, plan.tokens, hidden, plan, transpose_w=True)  # h's rows
    row_gates = None if gates is None else gates_sorted if expert_order else gates.reshape(-1)  # in h's row order
    grad_h = grad_w = grad_gates = None
    if row_gates is not None and need_gates:
        dot = (ungated.float() * rows.float()).sum(1).to(gates.dtype)
        grad_gates = (torch.empty_like(dot).index_copy_(0, plan.pairs, dot) if expert_order else dot).view(gates.shape)
    if need_h:
        gated = ungated * row_gates[:, None] if row_gates is not None else ungated
        grad_h = gated.to(rows.dtype).view(h.shape)
    if need_w:
        grad_w = weight_grad(rows, grad_y, hidden, plan.tokens, plan, weight.shape, scale=gates_sorted)
    return grad_h, grad_w, grad_gates


class TritonExpertUp(torch.autograd.Function):
    """``up_forward`` with ``up_backward``; only the layer's inputs are kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, plan: RoutingPlan, expert_order: bool):
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.expert_order = plan, expert_order
        return up_forward(x, weight, plan, expert_order)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_h):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (*up_backward(grad_h, x, weight, ctx.plan, ctx.expert_order, need[0], need[1]), None, None)


class TritonExpertDown(torch.autograd.Function):
    """``down_forward`` with ``down_backward``; the layer's inputs and the sorted gates are kept for backward."""

    @staticmethod
    def forward(ctx, h, weight, plan: RoutingPlan, gates, expert_order: bool):
        gates_sorted = sorted_gates(gates, plan)  # gathered once, read by forward and backward
        ctx.save_for_backward(h, weight, gates, gates_sorted)
        ctx.plan, ctx.expert_order = plan, expert_order
        return down_forward(h, weight, plan, gates_sorted, expert_order)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_y):
        h, weight, gates, gates_sorted = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_h, grad_w, grad_gates = down_backward(grad_y, h, weight, ctx.plan, gates, gates_sorted, ctx.expert_order,
                                                   need[0], need[1], need[3])
        return grad_h, grad_w, None, grad_gates, None


def expert_up_triton(x: torch.Tensor, weight: torch.Tensor, plan: RoutingPlan, expert_order: bool = False):
    return TritonExpertUp.apply(x, weight, plan, expert_order)


def expert_down_triton(h, weight, plan: RoutingPlan, gates=None, expert_order: bool = False) -> torch.Tensor:
    return TritonExpertDown.apply(h, weight, plan, gates, expert_order)
