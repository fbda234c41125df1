"""The dense two-layer FFN baseline: y = W2 act(W1 x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sffn_lab.layers.ffn_output import FFNOutput

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class DenseFFN(nn.Module):
    """x [B, S, D] → y [B, S, D] through d_ff hidden cells (keys W1 [d_ff, D], values W2 [D, d_ff])."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> FFNOutput:
        return FFNOutput(y=self.down(self.dropout(self.activation(self.up(x)))))
