"""What every feed-forward layer returns, so the model treats all variants alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingStats:
    """What one routed layer (an FFN or sMLP's token-mixing sMoE) reports about a batch.

    aux_loss:      scalar, already multiplied by its coefficient (balance / entropy loss), or None.
    expert_counts: [N_E] float, number of (token, slot) assignments per expert in this batch, or None
                   for layers without experts (dense).
    gate_mean:     scalar mean of the selected gate values, or None when the variant has no gate.
    """

    aux_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None
    gate_mean: torch.Tensor | None = None


@dataclass(kw_only=True)
class FFNOutput(RoutingStats):
    """Output of one feed-forward layer on a batch: y [B, S, D] and the layer's ``RoutingStats``."""

    y: torch.Tensor
