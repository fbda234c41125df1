"""The fast PyTorch path of the expert matmuls (any device, any float dtype; chosen off-GPU).

The layer's ``RoutingPlan`` gives the (token, k) pairs in expert order; the pairs are processed in
blocks: the block's input rows are gathered, multiplied by their experts' weights and written back
(``index_copy_`` for h, ``index_add_`` for y). The hidden activations h between the two products are
either per pair ([T, K, G]) or, with ``expert_order``, in the plan's order ([P, G], row r the pair
plan.pairs[r]), as the expert bank keeps them: then a block's rows of h are a slice, read and written in
place, and neither product gathers or scatters h or its gradient. Two strategies share this code:

- ``per_expert`` (the default on the CPU): one matmul per expert, the gathers and scatters over blocks of
  consecutive experts of about BLOCK_ROWS rows. A block's gathered rows stay in cache (gathering all P
  rows at once costs a P × D copy through memory, which ``sffn bench`` measures as the slower choice on
  CPUs), and many small experts share one gather, scatter and gate multiply instead of paying each op's
  dispatch per expert (at N_E 128 one block per expert was 11–15% slower).
- ``grouped`` (the default elsewhere): one block of all pairs and one grouped product,
  ``torch._grouped_mm`` where it computes them in one kernel (``grouped_mm_computes``: torch version, device
  capability, dtype, fewer than 1024 experts on CUDA; ``_aligned``: its layout; group ends stay on the
  device, so no host sync), else one matmul per expert (which needs the counts on the host).

h, x and the weights share one dtype (the dispatcher casts them as autocast would); the gates may be
wider (fp32 routing under mixed precision) and their gradient keeps their dtype. The autograd
functions keep only the layer's inputs and the plan for backward and re-gather there, so no gathered
copy of x or of the per-pair outputs stays alive between forward and backward.

Shapes: T tokens, K experts per token, P = T·K pairs, E experts, D model width, G expert width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sffn_lab.kernels.precision import autocast_off
from sffn_lab.kernels.routing_plan import PlanReads, RoutingPlan

GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what its CPU kernel takes
CUTLASS_GROUP_LIMIT = 1024  # torch._grouped_mm's CUDA kernel takes fewer groups than this (GroupMM.cu)
STRATEGIES = ("per_expert", "grouped")


BLOCK_ROWS = 4096  # the per_expert strategy gathers and scatters consecutive experts together up to about this


@dataclass
class Block:
    """The sorted pairs of consecutive experts ``first`` … ``first + len(counts) − 1`` (``counts``: rows of each,
    host ints), or of every expert (``counts`` None: the grouped strategy's one block, whose counts are read
    from the plan only where a split needs them, a host sync on CUDA)."""

    pairs: torch.Tensor
    tokens: torch.Tensor
    sorted_rows: slice  # the block's positions in the plan's expert order
    first: int
    counts: list[int] | None

    def take(self, hidden: torch.Tensor, expert_order: bool) -> torch.Tensor:
        """The block's rows of a per-pair tensor [P, G], in the block's order (a view in expert order)."""
        return hidden[self.sorted_rows] if expert_order else hidden.index_select(0, self.pairs)

    def put(self, hidden: torch.Tensor, rows: torch.Tensor, expert_order: bool) -> None:
        """Write the block's rows [n, G] into a per-pair tensor [P, G]."""
        if expert_order:
            hidden[self.sorted_rows] = rows
        else:
            hidden.index_copy_(0, self.pairs, rows)

    def experts(self, plan: RoutingPlan):
        """(expert, its row slice within the block) for each expert of the block with rows."""
        start = 0
        for e, n in enumerate(self.counts if self.counts is not None else plan.host_counts(), start=self.first):
            if n:
                yield e, slice(start, start + n)
            start += n


def blocks(plan: RoutingPlan, strategy: str) -> list[Block]:
    """``per_expert``: consecutive experts in blocks of about BLOCK_ROWS rows (at least one expert each, so an
    expert of BLOCK_ROWS rows or more is a block of its own); ``grouped``: one block of all pairs. No pairs (an
    empty batch): no blocks (``torch._grouped_mm`` refuses a weight gradient's zero-length contraction)."""
    if plan.pairs.shape[0] == 0:
        return []
    if strategy == "grouped":
        return [Block(plan.pairs, plan.tokens, slice(None), 0, None)]
    ends, counts = plan.host_offsets(), plan.host_counts()
    result, first = [], 0
    for e in range(len(counts)):
        if ends[e + 1] - ends[first] >= BLOCK_ROWS or e == len(counts) - 1:
            start, end = ends[first], ends[e + 1]
            if end > start:
                result.append(Block(plan.pairs[start:end], plan.tokens[start:end], slice(start, end), first,
                                    counts[first : e + 1]))
            first = e + 1
    return result


def pick_strategy(t: torch.Tensor, strategy: str | None) -> str:
    """``per_expert`` on the CPU (measured faster there: see ``sffn bench``), ``grouped`` elsewhere."""
    strategy = strategy or ("per_expert" if t.device.type == "cpu" else "grouped")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    return strategy


def torch_release() -> tuple[int, int]:
    """(major, minor) of the running torch, read from ``torch.__version__`` ("2.9.0a0+git…" → (2, 9))."""
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


@torch.compiler.assume_constant_result  # a fact about the device and the torch: one answer while tracing
def grouped_mm_computes(device: torch.device, dtype: torch.dtype, groups: int) -> bool:
    """Whether ``torch._grouped_mm`` computes ``groups`` groups of this dtype on this device in one kernel, with
    the group ends left on the device (no host sync).

    Facts relied on (aten/src/ATen/native/cuda/GroupedBlas.cpp at pytorch/pytorch@00d4eaf and GroupMM.cu;
    the issues and pull requests named):
    - torch < 2.8 has no ``torch._grouped_mm``; torch 2.8 registers no CPU kernel (NotImplementedError,
      huggingface/transformers#46743) and on CUDA accepts compute capability 9.x only, raising elsewhere
      ("only supported on CUDA devices with compute capability = 9.0", huggingface/transformers#47999,
      pytorch/pytorch#150982).
    - torch ≥ 2.9: the CUTLASS kernel ``bf16bf16_grouped_mm`` runs where ``_scaled_mm_allowed_device(sm90_only,
      sm100_only)`` holds, i.e. capability major 9 or 10, and all of a, b and out are bf16; any other CUDA case
      takes ``_grouped_mm_fallback``, a loop of mm over ``offs.cpu()`` (a host sync per call). The CPU has a
      kernel (transformers' ``_can_use_grouped_mm`` refuses the CPU up to torch 2.8 only); fp32, fp16 and bf16
      on it are checked by this project's tests on torch 2.13.0+cpu, the versions between were not run here.
    - The CUTLASS kernel refuses ``group_count >= 1024`` (``TORCH_CHECK(group_count < 1024, "Can't process
      more than 1024 groups")`` in GroupMM.cu).
    - ROCm builds take the CK kernel on gfx942/gfx950 only; not used here (the per-expert path runs instead).
    The capability is the tensor's device's: the op runs under a device guard of its inputs, so the
    ``getCurrentDeviceProperties()`` it checks is that device's.
    """
    release = torch_release()
    if not hasattr(torch, "_grouped_mm") or release < (2, 8):
        return False
    if device.type == "cpu":
        return release >= (2, 9) and dtype in GROUPED_MM_DTYPES
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    major, _ = torch.cuda.get_device_capability(device)
    cutlass = major == 9 or (major == 10 and release >= (2, 9))
    return cutlass and dtype == torch.bfloat16 and groups < CUTLASS_GROUP_LIMIT


def _aligned(t: torch.Tensor) -> bool:
    """The layout ``torch._grouped_mm`` takes (``check_valid_strides_and_return_transposed`` in
    aten/src/ATen/native/GroupedMMUtils.h): base address on 16 bytes; of the last two dimensions one has
    stride 1 and the other a stride at least the first's size (so never 0: an expanded matrix dimension is
    refused) and a multiple of 16 bytes; the leading (group) stride a multiple of 16 bytes."""
    size = t.element_size()
    rows, cols = t.shape[-2:]
    row_stride, col_stride = t.stride()[-2:]
    if col_stride == 1:
        major = row_stride >= max(1, cols) and row_stride * size % 16 == 0
    elif row_stride == 1:
        major = col_stride >= max(1, rows) and col_stride * size % 16 == 0
    else:
        major = False
    return t.data_ptr() % 16 == 0 and major and all(s * size % 16 == 0 for s in t.stride()[:-2])


def use_grouped_mm(*tensors: torch.Tensor, groups: int) -> bool:
    """Whether one ``torch._grouped_mm`` of ``groups`` groups computes these operands (2-D or 3-D, one dtype and
    device) without a host sync: see ``grouped_mm_computes`` and ``_aligned``."""
    first = tensors[0]
    return grouped_mm_computes(first.device, first.dtype, groups) and all(
        t.dtype == first.dtype and _aligned(t) for t in tensors
    )


def block_matmul(rows: torch.Tensor, weight: torch.Tensor, block: Block, plan: RoutingPlan) -> torch.Tensor:
    """rows [n, I] of the block in expert order, weight [E, I, O] → rows_e @ W[e] per expert, [n, O]."""
    if block.counts is None and use_grouped_mm(rows, weight, groups=plan.n_experts):
        return torch._grouped_mm(rows, weight, offs=plan.group_ends())
    if block.counts is not None and len(block.counts) == 1:
        return rows @ weight[block.first]
    out = rows.new_empty(rows.shape[0], weight.shape[2])
    for e, part in block.experts(plan):
        torch.matmul(rows[part], weight[e], out=out[part])
    return out


def block_weight_grad(a: torch.Tensor, b: torch.Tensor, block: Block, plan: RoutingPlan, out: torch.Tensor) -> None:
    """a [n, I], b [n, O] in expert order → out[e] = a_eᵀ @ b_e in out [E, I, O] (experts without rows untouched)."""
    if block.counts is None and use_grouped_mm(a.t(), b, groups=plan.n_experts):
        out.copy_(torch._grouped_mm(a.t(), b, offs=plan.group_ends()))
        return
    for e, part in block.experts(plan):
        torch.matmul(a[part].t(), b[part], out=out[e])


def _scaled(rows: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """rows [n, G] · gates [n, 1] as a new tensor of rows' dtype (products at the wider dtype, rounded once)."""
    return torch.mul(rows, gates, out=torch.empty_like(rows))


def plan_reads(operand: torch.Tensor, n_experts: int, strategy: str | None = None) -> PlanReads:
    """What these products read of the plan for this operand: the offsets on the host unless one grouped
    product computes each (it may still read them, where an operand's layout refuses ``torch._grouped_mm``)."""
    one_kernel = (pick_strategy(operand, strategy) == "grouped"
                  and grouped_mm_computes(operand.device, operand.dtype, n_experts))
    return PlanReads(host_offsets=not one_kernel)


def up_forward(x, weight, plan: RoutingPlan, expert_order: bool, strategy: str | None = None) -> torch.Tensor:
    """h[t, k] = x[t] @ W[indices[t, k]];  x [T, D], W [E, D, G] → h [T, K, G], or [P, G] in the plan's expert
    order (row r: pair plan.pairs[r]). ``strategy``: see ``pick_strategy``."""
    strategy = pick_strategy(x, strategy)
    T, K = plan.indices.shape
    h = x.new_empty(T * K, weight.shape[2])
    for b in blocks(plan, strategy):
        b.put(h, block_matmul(x.index_select(0, b.tokens), weight, b, plan), expert_order)
    return h if expert_order else h.view(T, K, h.shape[1])  # sizes spelt out: -1 is ambiguous when T = 0


def up_backward(grad_h, x, weight, plan: RoutingPlan, expert_order: bool, need_x: bool, need_w: bool,
                strategy: str | None = None):
    """grad_h [T, K, G] (or [P, G] in expert order) → (dL/dx [T, D] or None, dL/dW [E, D, G] or None)."""
    strategy = pick_strategy(x, strategy)
    grad_h = grad_h.reshape(-1, grad_h.shape[-1]).to(x.dtype)
    grad_x = torch.zeros_like(x) if need_x else None
    # experts no pair used keep a zero gradient: only the grouped product writes every expert
    grad_w = torch.zeros_like(weight) if need_w else None
    for b in blocks(plan, strategy):
        g = b.take(grad_h, expert_order)
        if grad_x is not None:
            grad_x.index_add_(0, b.tokens, block_matmul(g, weight.transpose(1, 2), b, plan))
        if grad_w is not None:
            block_weight_grad(x.index_select(0, b.tokens), g, b, plan, grad_w)
    return grad_x, grad_w


def down_forward(h, weight, plan: RoutingPlan, gates, expert_order: bool, strategy: str | None = None) -> torch.Tensor:
    """y[t] = Σ_k g[t, k] · h[t, k] @ W[indices[t, k]];  h [T, K, G] (or [P, G] in expert order), W [E, G, D],
    g [T, K] → y [T, D]."""
    strategy = pick_strategy(h, strategy)
    rows = h.reshape(-1, h.shape[-1])
    y = h.new_zeros(plan.indices.shape[0], weight.shape[2])
    for b in blocks(plan, strategy):
        h_b = b.take(rows, expert_order)
        if gates is not None:  # g·(h W) = (g·h) W: the gate scales the G-wide side rather than the D-wide one
            h_b = _scaled(h_b, gates.reshape(-1).index_select(0, b.pairs).unsqueeze(1))
        y.index_add_(0, b.tokens, block_matmul(h_b, weight, b, plan))
    return y


def down_backward(grad_y, h, weight, plan: RoutingPlan, gates, expert_order: bool, need_h: bool, need_w: bool,
                  need_gates: bool, strategy: str | None = None):
    """grad_y [T, D] → (dL/dh shaped as h, dL/dW [E, G, D], dL/dg [T, K]), each None where not needed."""
    strategy = pick_strategy(h, strategy)
    rows = h.reshape(-1, h.shape[-1])
    grad_y = grad_y.to(h.dtype)
    # every pair is written once below, so the gradients of h and of the gates need no zero fill
    grad_h = torch.empty_like(rows) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    grad_gates = gates.new_empty(gates.numel()) if gates is not None and need_gates else None
    for b in blocks(plan, strategy):
        grad_out = grad_y.index_select(0, b.tokens)  # dL/d(out_p), [n, D]
        grad_pre = block_matmul(grad_out, weight.transpose(1, 2), b, plan)  # dL/d(g_p·h_p)
        h_b = b.take(rows, expert_order)
        if grad_gates is not None:
            dot = (grad_pre * h_b).sum(1, dtype=torch.promote_types(h_b.dtype, torch.float32))  # ≥ fp32 sums
            grad_gates.index_copy_(0, b.pairs, dot.to(gates.dtype))
        if gates is not None:
            g = gates.reshape(-1).index_select(0, b.pairs).unsqueeze(1)
            grad_pre.mul_(g)
            h_b = _scaled(h_b, g)  # dW = (g·h)ᵀ dY, as in forward the G-wide side scaled
        if grad_h is not None:
            b.put(grad_h, grad_pre, expert_order)
        if grad_w is not None:
            block_weight_grad(h_b, grad_out, b, plan, grad_w)
    grad_h = grad_h.view(h.shape) if grad_h is not None else None
    grad_gates = grad_gates.view(gates.shape) if grad_gates is not None else None
    return grad_h, grad_w, grad_gates


class ExpertUp(torch.autograd.Function):
    """``up_forward`` with ``up_backward``; only the layer's inputs are kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, plan: RoutingPlan, strategy, expert_order):
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.strategy, ctx.expert_order = plan, strategy, expert_order
        return up_forward(x, weight, plan, expert_order, strategy)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_h):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = up_backward(grad_h, x, weight, ctx.plan, ctx.expert_order, need[0], need[1], ctx.strategy)
        return (*grads, None, None, None)


class ExpertDown(torch.autograd.Function):
    """``down_forward`` with ``down_backward``; only the layer's inputs are kept for backward."""

    @staticmethod
    def forward(ctx, h, weight, plan: RoutingPlan, gates, strategy, expert_order):
        ctx.save_for_backward(h, weight, gates)
        ctx.plan, ctx.strategy, ctx.expert_order = plan, strategy, expert_order
        return down_forward(h, weight, plan, gates, expert_order, strategy)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_y):
        h, weight, gates = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_h, grad_w, grad_gates = down_backward(grad_y, h, weight, ctx.plan, gates, ctx.expert_order, need[0],
                                                   need[1], need[3], ctx.strategy)
        return grad_h, grad_w, None, grad_gates, None, None


def expert_up_torch(x, weight, plan: RoutingPlan, strategy: str | None = None, expert_order: bool = False):
    return ExpertUp.apply(x, weight, plan, pick_strategy(x, strategy), expert_order)


def expert_down_torch(h, weight, plan: RoutingPlan, gates=None, strategy: str | None = None,
                      expert_order: bool = False) -> torch.Tensor:
    return ExpertDown.apply(h, weight, plan, gates, pick_strategy(h, strategy), expert_order)
