"""The fast PyTorch path of the expert matmuls (any device; chosen off-GPU).

The (token, k) pairs are sorted by expert once per call. Each expert then gathers its rows,
multiplies them with one matmul and scatters the result (index_copy for h, index_add for y), one
expert at a time: the gathered block of one expert stays in cache instead of a P × D copy of the
whole batch going through memory. The autograd functions keep only the layer's inputs and the
sort order for backward and re-gather there, so no gathered copy of x or of the per-pair outputs
stays alive between forward and backward.

Shapes: T tokens, K experts per token, P = T·K pairs, E experts, D model width, G expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertOrder:
    """Per expert e: ``pairs[e]`` (flat pair ids p = t·K + k, ascending) and ``tokens[e]`` (p // K)."""

    pairs: list[torch.Tensor]
    tokens: list[torch.Tensor]

    @classmethod
    def of(cls, indices: torch.Tensor, n_experts: int) -> ExpertOrder:
        flat = indices.reshape(-1)
        sorted_pairs = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n_experts).tolist()
        pairs = list(torch.split(sorted_pairs, counts))
        return cls(pairs, [p // indices.shape[1] for p in pairs])

    def experts(self):
        """Experts with at least one pair."""
        return (e for e, p in enumerate(self.pairs) if p.numel())


class ExpertUp(torch.autograd.Function):
    """h[t, k] = x[t] @ W[indices[t, k]];  x [T, D], W [E, D, G], indices [T, K] → h [T, K, G]."""

    @staticmethod
    def forward(ctx, x, weight, indices):
        T, K = indices.shape
        order = ExpertOrder.of(indices, weight.shape[0])
        h = x.new_zeros(T * K, weight.shape[2])
        for e in order.experts():
            h.index_copy_(0, order.pairs[e], x.index_select(0, order.tokens[e]) @ weight[e])
        ctx.save_for_backward(x, weight)
        ctx.order = order
        return h.view(T, K, -1)

    @staticmethod
    def backward(ctx, grad_h):
        x, weight = ctx.saved_tensors
        order = ctx.order
        grad_h = grad_h.reshape(-1, grad_h.shape[-1])
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for e in order.experts():
            g = grad_h.index_select(0, order.pairs[e])
            if grad_x is not None:
                grad_x.index_add_(0, order.tokens[e], g @ weight[e].t())
            if grad_w is not None:
                torch.matmul(x.index_select(0, order.tokens[e]).t(), g, out=grad_w[e])
        return grad_x, grad_w, None


class ExpertDown(torch.autograd.Function):
    """y[t] = Σ_k g[t, k] · h[t, k] @ W[indices[t, k]];  h [T, K, G], W [E, G, D], g [T, K] → y [T, D]."""

    @staticmethod
    def forward(ctx, h, weight, indices, gates):
        T, K, G = h.shape
        order = ExpertOrder.of(indices, weight.shape[0])
        rows = h.reshape(T * K, G)
        flat_gates = gates.reshape(-1) if gates is not None else None
        y = h.new_zeros(T, weight.shape[2])
        for e in order.experts():
            out = rows.index_select(0, order.pairs[e]) @ weight[e]
            if flat_gates is not None:
                out.mul_(flat_gates.index_select(0, order.pairs[e]).unsqueeze(1))
            y.index_add_(0, order.tokens[e], out)
        ctx.save_for_backward(h, weight, gates)
        ctx.order = order
        return y

    @staticmethod
    def backward(ctx, grad_y):
        h, weight, gates = ctx.saved_tensors
        order = ctx.order
        T, K, G = h.shape
        rows = h.reshape(T * K, G)
        flat_gates = gates.reshape(-1) if gates is not None else None
        grad_h = torch.zeros_like(rows) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_gates = torch.zeros_like(flat_gates) if flat_gates is not None and ctx.needs_input_grad[3] else None
        for e in order.experts():
            pairs = order.pairs[e]
            gy = grad_y.index_select(0, order.tokens[e])  # dL/d(out_p), ungated, [n, D]
            h_e = rows.index_select(0, pairs)
            ungated = gy @ weight[e].t()  # [n, G]
            if grad_gates is not None:
                grad_gates.index_copy_(0, pairs, (ungated * h_e).sum(1))
            if flat_gates is not None:
                g = flat_gates.index_select(0, pairs).unsqueeze(1)
                ungated.mul_(g)
                gy = gy * g
            if grad_h is not None:
                grad_h.index_copy_(0, pairs, ungated)
            if grad_w is not None:
                torch.matmul(h_e.t(), gy, out=grad_w[e])
        grad_h = grad_h.view(T, K, G) if grad_h is not None else None
        grad_gates = grad_gates.view(T, K) if grad_gates is not None else None
        return grad_h, grad_w, None, grad_gates


def expert_up_torch(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return ExpertUp.apply(x, weight, indices)


def expert_down_torch(h, weight, indices, gates=None) -> torch.Tensor:
    return ExpertDown.apply(h, weight, indices, gates)
