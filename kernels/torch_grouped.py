"""The fast PyTorch path of the expert matmuls (any device; chosen off-GPU).

The (token, k) pairs are sorted by expert once per call, then processed in blocks of pairs: the
block's input rows are gathered, multiplied by their experts' weights and written back
(``index_copy_`` for h, gate-scaled ``index_add_`` for y). Two strategies share this code:

- ``per_expert`` (the default on the CPU): one block per expert, one matmul each. The gathered rows
  of one expert stay in cache; gathering all P rows at once instead costs a P × D copy through memory
  (64 MB at 8192 tokens, K = 4, D = 512), which ``sffn bench`` measures as the slower choice on CPUs.
- ``grouped`` (the default elsewhere): one block of all pairs and one grouped product,
  ``torch._grouped_mm`` where it takes the operands (dtype, 16-byte alignment), else a split + matmul.

The autograd functions keep only the layer's inputs and the sort order for backward and re-gather
there, so no gathered copy of x or of the per-pair outputs stays alive between forward and backward.

Shapes: T tokens, K experts per token, P = T·K pairs, E experts, D model width, G expert width.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STRATEGIES = ("per_expert", "grouped")


@dataclass
class Block:
    """Pairs of the experts ``experts`` (a slice of E), in expert order: ``counts`` of them per expert."""

    pairs: torch.Tensor
    tokens: torch.Tensor
    experts: slice
    counts: list[int]


@dataclass
class ExpertOrder:
    """Pairs sorted (stably) by expert: ``pairs`` [P] (flat ids p = t·K + k), ``tokens`` [P] (p // K),
    ``counts`` [E] (pairs per expert)."""

    pairs: torch.Tensor
    tokens: torch.Tensor
    counts: list[int]

    @classmethod
    def of(cls, indices: torch.Tensor, n_experts: int) -> ExpertOrder:
        flat = indices.reshape(-1)
        counts = torch.bincount(flat, minlength=n_experts).tolist()
        return cls.from_pairs(torch.argsort(flat, stable=True), counts, indices.shape[1])

    @classmethod
    def from_pairs(cls, pairs: torch.Tensor, counts: list[int], k: int) -> ExpertOrder:
        return cls(pairs, pairs // k, counts)

    def blocks(self, strategy: str) -> list[Block]:
        """``per_expert``: one block per non-empty expert; ``grouped``: one block of all pairs."""
        if strategy == "grouped":
            return [Block(self.pairs, self.tokens, slice(None), self.counts)]
        ends = list(accumulate(self.counts))
        return [
            Block(self.pairs[end - n : end], self.tokens[end - n : end], slice(e, e + 1), [n])
            for e, (n, end) in enumerate(zip(self.counts, ends, strict=True))
            if n
        ]


def pick_strategy(t: torch.Tensor, strategy: str | None) -> str:
    """``per_expert`` on the CPU (measured faster there: see ``sffn bench``), ``grouped`` elsewhere."""
    strategy = strategy or ("per_expert" if t.device.type == "cpu" else "grouped")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    return strategy


def _aligned(t: torch.Tensor) -> bool:
    """Base address and every non-unit stride on 16-byte boundaries (``torch._grouped_mm``'s requirement)."""
    size = t.element_size()
    strides = (s for s, n in zip(t.stride(), t.shape, strict=True) if s != 1 and n > 1)
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in strides)


def use_grouped_mm(*tensors: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: it exists, they are aligned, and of a dtype it
    supports on their device (CPU: fp32, fp16, bf16; CUDA: bf16)."""
    return hasattr(torch, "_grouped_mm") and all(
        t.dtype in (GROUPED_MM_DTYPES if t.device.type == "cpu" else (torch.bfloat16,)) and _aligned(t)
        for t in tensors
    )


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """rows [P, I] in expert order (counts[e] rows of expert e), weight [E, I, O] → rows_e @ W[e], [P, O]."""
    if len(counts) == 1:
        return rows @ weight[0]
    if use_grouped_mm(rows, weight):
        return torch._grouped_mm(rows, weight, offs=_offsets(counts))
    out = rows.new_empty(rows.shape[0], weight.shape[2])
    for e, (a, o) in enumerate(zip(rows.split(counts), out.split(counts), strict=True)):
        if len(a):
            torch.matmul(a, weight[e], out=o)
    return out


def grouped_weight_grad(a: torch.Tensor, b: torch.Tensor, counts: list[int], out: torch.Tensor) -> None:
    """a [P, I], b [P, O] in expert order → out[e] = a_eᵀ @ b_e in out [E, I, O] (untouched if e is empty)."""
    if len(counts) > 1 and use_grouped_mm(a.t(), b):
        out.copy_(torch._grouped_mm(a.t(), b, offs=_offsets(counts)))
        return
    for e, (a_e, b_e) in enumerate(zip(a.split(counts), b.split(counts), strict=True)):
        if len(a_e):
            torch.matmul(a_e.t(), b_e, out=out[e])


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(list(accumulate(counts)), dtype=torch.int32)


class ExpertUp(torch.autograd.Function):
    """h[t, k] = x[t] @ W[indices[t, k]];  x [T, D], W [E, D, G], indices [T, K] → h [T, K, G]."""

    @staticmethod
    def forward(ctx, x, weight, indices, strategy):
        T, K = indices.shape
        order = ExpertOrder.of(indices, weight.shape[0])
        h = x.new_empty(T * K, weight.shape[2])
        for b in order.blocks(strategy):
            rows = x.index_select(0, b.tokens)
            h.index_copy_(0, b.pairs, grouped_matmul(rows, weight[b.experts], b.counts))
        ctx.save_for_backward(x, weight, order.pairs)
        ctx.counts, ctx.k, ctx.strategy = order.counts, K, strategy
        return h.view(T, K, -1)

    @staticmethod
    def backward(ctx, grad_h):
        x, weight, pairs = ctx.saved_tensors
        order = ExpertOrder.from_pairs(pairs, ctx.counts, ctx.k)
        grad_h = grad_h.reshape(-1, grad_h.shape[-1])
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for b in order.blocks(ctx.strategy):
            g = grad_h.index_select(0, b.pairs)
            if grad_x is not None:
                grad_x.index_add_(0, b.tokens, grouped_matmul(g, weight[b.experts].transpose(1, 2), b.counts))
            if grad_w is not None:
                grouped_weight_grad(x.index_select(0, b.tokens), g, b.counts, grad_w[b.experts])
        return grad_x, grad_w, None, None


class ExpertDown(torch.autograd.Function):
    """y[t] = Σ_k g[t, k] · h[t, k] @ W[indices[t, k]];  h [T, K, G], W [E, G, D], g [T, K] → y [T, D]."""

    @staticmethod
    def forward(ctx, h, weight, indices, gates, strategy):
        T, K, G = h.shape
        order = ExpertOrder.of(indices, weight.shape[0])
        rows = h.reshape(T * K, G)
        y = h.new_zeros(T, weight.shape[2])
        for b in order.blocks(strategy):
            out = grouped_matmul(rows.index_select(0, b.pairs), weight[b.experts], b.counts)
            if gates is not None:
                out.mul_(gates.reshape(-1).index_select(0, b.pairs).unsqueeze(1))
            y.index_add_(0, b.tokens, out)
        ctx.save_for_backward(h, weight, gates, order.pairs)
        ctx.counts, ctx.strategy = order.counts, strategy
        return y

    @staticmethod
    def backward(ctx, grad_y):
        h, weight, gates, pairs = ctx.saved_tensors
        T, K, G = h.shape
        order = ExpertOrder.from_pairs(pairs, ctx.counts, K)
        rows = h.reshape(T * K, G)
        # every pair is written once below, so the gradients of h and of the gates need no zero fill
        grad_h = rows.new_empty(T * K, G) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_gates = rows.new_empty(T * K) if gates is not None and ctx.needs_input_grad[3] else None
        for b in order.blocks(ctx.strategy):
            grad_out = grad_y.index_select(0, b.tokens)  # dL/d(ungated out_p), [n, D]
            grad_pre = grouped_matmul(grad_out, weight[b.experts].transpose(1, 2), b.counts)  # dL/d(g_p·h_p)
            h_b = rows.index_select(0, b.pairs)
            if grad_gates is not None:
                grad_gates.index_copy_(0, b.pairs, (grad_pre * h_b).sum(1))
            if gates is not None:
                g = gates.reshape(-1).index_select(0, b.pairs).unsqueeze(1)
                grad_pre.mul_(g)
                grad_out.mul_(g)
            if grad_h is not None:
                grad_h.index_copy_(0, b.pairs, grad_pre)
            if grad_w is not None:
                grouped_weight_grad(h_b, grad_out, b.counts, grad_w[b.experts])
        grad_h = grad_h.view(T, K, G) if grad_h is not None else None
        grad_gates = grad_gates.view(T, K) if grad_gates is not None else None
        return grad_h, grad_w, None, grad_gates, None


def expert_up_torch(x, weight, indices, strategy: str | None = None):
    return ExpertUp.apply(x, weight, indices, pick_strategy(x, strategy))


def expert_down_torch(h, weight, indices, gates=None, strategy: str | None = None) -> torch.Tensor:
    return ExpertDown.apply(h, weight, indices, gates, pick_strategy(h, strategy))
