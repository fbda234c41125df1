"""BASE layers' own expert form (fairseq ``BaseLayer`` / ``BaseSublayer``, Lewis et al. 2021).

For a token x [D] routed to expert e with gate α = σ(x·c_e) (c_e: the router's centroid row e, the BASE router's
selector), fairseq's BASE layer returns α·(x + FFN_e(LN_e x)) + (1 − α)·x = x + α·FFN_e(LN_e x), with

    FFN_e(z) = W2_e act(W1_e z + b1_e) + b2_e

each expert its own LayerNorm LN_e (weight 1, bias 0), ``nn.Linear`` init of W1_e, b1_e and b2_e, and W2_e zero
(fairseq zeroes ``ff2.weight``, not its bias). The FFN layer returns the update y = Σ_k α_k·FFN_{e_k}(LN_{e_k} x)
(the block adds x); K > 1 sums the K experts' updates (fairseq: K = 1, one sublayer per expert).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sffn_lab.kernels import RoutingPlan, expert_down, expert_up
from sffn_lab.layers.dense import ACTIVATIONS


class FairseqBaseExperts(nn.Module):
    """N_E experts, each LN_e then a two-layer FFN of width G with biases: the expert bank's interface,
    ``forward(x [T, D], plan, gates [T, K]) -> y [T, D]``."""

    def __init__(self, d_model: int, n_experts: int, expert_size: int, activation: str = "relu",
                 dropout: float = 0.0):
        super().__init__()
        E, D, G = n_experts, d_model, expert_size
        self.norm_weight = nn.Parameter(torch.ones(E, D))
        self.norm_bias = nn.Parameter(torch.zeros(E, D))
        # nn.Linear's init, per expert: weights and biases U(±1/√fan_in); W1 stored [E, D, G] (x @ W1)
        self.keys = nn.Parameter(torch.empty(E, D, G).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D)))
        self.key_bias = nn.Parameter(torch.empty(E, G).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D)))
        self.values = nn.Parameter(torch.zeros(E, G, D))  # fairseq: ff2.weight.data.zero_()
        self.value_bias = nn.Parameter(torch.empty(E, D).uniform_(-1 / math.sqrt(G), 1 / math.sqrt(G)))
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    @property
    def n_experts(self) -> int:
        return self.keys.shape[0]

    def forward(self, x: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor | None) -> torch.Tensor:
        """x [T, D], the plan of indices [T, K], gates [T, K] → y [T, D] = Σ_k gate·FFN_e(LN_e x)."""
        T, K = plan.indices.shape
        experts = plan.indices.reshape(-1)  # [P], P = T·K: one row per (token, expert) pair
        pairs = plan if K == 1 else RoutingPlan.of(experts[:, None], self.n_experts)
        normed = F.layer_norm(x, x.shape[-1:]).repeat_interleave(K, dim=0)  # eps 1e-5, as nn.LayerNorm
        z = normed * self.norm_weight[experts] + self.norm_bias[experts]  # LN_e x [P, D]
        hidden = self.dropout(self.activation(expert_up(z, self.keys, pairs)[:, 0] + self.key_bias[experts]))
        y = expert_down(hidden[:, None], self.values, pairs) + self.value_bias[experts]  # FFN_e(LN_e x) [P, D]
        if gates is not None:
            y = y * gates.reshape(-1, 1).to(y.dtype)
        return y.view(T, K, -1).sum(1)
