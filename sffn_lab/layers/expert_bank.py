"""The expert bank: N_E blocks of G memory cells, computed only for the blocks a router selected.

    y[t] = Σ_k gate[t, k] · V_eᵀ act(K_e x[t]),   e = indices[t, k]

with keys K [N_E, D, G] and values V [N_E, G, D]. The two gathered grouped matmuls run through
``sffn_lab.kernels`` (Triton on CUDA, a sorted grouped path on the CPU); both read the layer's one
``RoutingPlan`` (the pairs sorted by expert).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sffn_lab.kernels import RoutingPlan, expert_down, expert_up
from sffn_lab.layers.dense import ACTIVATIONS


class ExpertBank(nn.Module):
    def __init__(self, d_model: int, n_experts: int, expert_size: int, activation: str = "relu",
                 dropout: float = 0.0):
        super().__init__()
        self.keys = nn.Parameter(torch.empty(n_experts, d_model, expert_size))
        self.values = nn.Parameter(torch.empty(n_experts, expert_size, d_model))
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)  # on the hidden units of the selected experts, like the dense FFN's
        # Like the dense FFN's nn.Linear layers: uniform ±1/√fan_in, values seeing all N_E·G cells.
        nn.init.uniform_(self.keys, -(d_model**-0.5), d_model**-0.5)
        nn.init.uniform_(self.values, -((n_experts * expert_size) ** -0.5), (n_experts * expert_size) ** -0.5)

    @property
    def n_experts(self) -> int:
        return self.keys.shape[0]

    def init_scaled_(self, scale: float, per_expert: bool = False) -> None:
        """The σ-MoE paper's init: N(0, scale² / fan_in) with fan-in D for the keys and, for the values, N_E·G
        (the cells of the dense layer the bank approximates) or, ``per_expert``, G (each expert as its own
        small FFN: the paper's Switch and its "standard init" ablation)."""
        E, D, G = self.keys.shape
        nn.init.normal_(self.keys, std=scale / math.sqrt(D))
        nn.init.normal_(self.values, std=scale / math.sqrt(G if per_expert else E * G))

    def block_means(self) -> torch.Tensor:
        """Mean key vector of each block [N_E, D] (Avg-K's block score)."""
        return self.keys.mean(dim=2)

    def forward(self, x: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor | None) -> torch.Tensor:
        """x [T, D], the plan of indices [T, K], gates [T, K] or None → y [T, D]."""
        hidden = self.dropout(self.activation(expert_up(x, self.keys, plan, expert_order=True)))  # [P, G]
        return expert_down(hidden, self.values, plan, gates, expert_order=True)
