"""Random inputs of one expert-bank product and a forward+backward closure over them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sffn_lab.kernels import RoutingPlan, expert_down, expert_up
from sffn_lab.kernels.torch_grouped import expert_down_torch, expert_up_torch


@dataclass
class ExpertProblem:
    """x [T, D], keys [E, D, G], values [E, G, D] and gates [T, K] (all requiring grad), indices [T, K]:
    K distinct experts per token, uniformly at random (balanced in expectation)."""

    x: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    gates: torch.Tensor

    @classmethod
    def random(cls, tokens: int, d_model: int, n_experts: int, expert_size: int, top_k: int, device="cpu"):
        def leaf(*shape, scale=1.0):
            return (torch.randn(*shape, device=device) * scale).requires_grad_(True)

        return cls(
            x=leaf(tokens, d_model),
            keys=leaf(n_experts, d_model, expert_size, scale=d_model**-0.5),
            values=leaf(n_experts, expert_size, d_model, scale=(n_experts * expert_size) ** -0.5),
            indices=torch.rand(tokens, n_experts, device=device).topk(top_k, dim=1).indices,
            gates=torch.rand(tokens, top_k, device=device).requires_grad_(True),
        )

    def fwd_bwd(self, moe: Callable[..., torch.Tensor]) -> Callable[[], None]:
        """A closure computing y = moe(x, keys, values, indices, gates), then backward of Σ y·dy."""
        leaves = (self.x, self.keys, self.values, self.gates)
        grad_y = torch.randn_like(self.x)

        def step() -> None:
            for t in leaves:
                t.grad = None
            y = moe(self.x, self.keys, self.values, self.indices, self.gates)
            y.backward(grad_y)

        return step


def dense_ffn_fwd_bwd(tokens: int, d_model: int, d_ff: int, device="cpu") -> Callable[[], None]:
    """The FLOP-matched limit of an expert bank with K·G = d_ff: relu(x W1) W2 with x [T, D], W1 [D, d_ff],
    W2 [d_ff, D], forward then backward of Σ y·dy (plain GEMMs: the same multiply-adds, no gather or scatter)."""
    x = torch.randn(tokens, d_model, device=device, requires_grad=True)
    w1 = (torch.randn(d_model, d_ff, device=device) * d_model**-0.5).requires_grad_(True)
    w2 = (torch.randn(d_ff, d_model, device=device) * d_ff**-0.5).requires_grad_(True)
    grad_y = torch.randn_like(x)

    def step() -> None:
        for t in (x, w1, w2):
            t.grad = None
        (torch.relu(x @ w1) @ w2).backward(grad_y)

    return step


def sparse_moe(backend: str | None = None, strategy: str | None = None) -> Callable[..., torch.Tensor]:
    """The expert bank's computation through ``sffn_lab.kernels`` (backend), or its torch path (strategy), with h
    in expert order between the products as the bank keeps it."""

    def moe(x, keys, values, indices, gates):
        plan = RoutingPlan.of(indices, keys.shape[0])  # once per layer, as the expert bank does
        if strategy is not None:
            h = expert_up_torch(x, keys, plan, strategy, expert_order=True)
            return expert_down_torch(torch.relu(h), values, plan, gates, strategy, expert_order=True)
        h = expert_up(x, keys, plan, backend, expert_order=True)
        return expert_down(torch.relu(h), values, plan, gates, backend, expert_order=True)

    return moe
