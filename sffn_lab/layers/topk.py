"""Top-K activation FFN (VanillaM when seen as G = 1 blocks): every key is scored, the K largest kept."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sffn_lab.layers.base import FFNOutput
from sffn_lab.layers.dense import ACTIVATIONS


class TopKFFN(nn.Module):
    """y = Σ_{j ∈ top-K of act(W1 x + b1)} act(·)_j · W2[:, j] + b2; x [B, S, D] → [B, S, D].

    The same parameters as the dense FFN; only the value side is sparse (an embedding bag over the
    K selected cells), so with K = d_ff it equals the dense FFN.
    """

    def __init__(self, d_model: int, d_ff: int, k: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.k = k
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> FFNOutput:
        B, S, D = x.shape
        hidden = self.activation(self.up(x.reshape(B * S, D)))
        values, cells = hidden.topk(self.k, dim=-1)
        y = F.embedding_bag(cells, self.down.weight.t(), per_sample_weights=self.dropout(values), mode="sum")
        counts = torch.bincount(cells.reshape(-1), minlength=hidden.shape[-1]).float()
        return FFNOutput((y + self.down.bias).view(B, S, D), expert_counts=counts)
