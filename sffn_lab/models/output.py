"""The output record every backbone returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sffn_lab.layers.ffn_output import RoutingStats


@dataclass
class LMOutput:
    """logits [B, S, V]; layer_stats: the ``RoutingStats`` of every routed or FFN layer, in depth order
    (for sMLP's sparse blocks: the FFN's, then the token-mixing sMoE's).

    ``loss_mask`` [S] (bool) marks positions whose prediction counts towards the loss, or None for all
    (sMLP partial prediction scores only the tail of each sequence). ``memory``: the Transformer-XL cache
    for the next segment, per layer [B, M, D] (detached), or None for a model without memory.
    """

    logits: torch.Tensor
    layer_stats: list[RoutingStats] = field(default_factory=list)
    loss_mask: torch.Tensor | None = None
    memory: list[torch.Tensor] | None = None

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the layers' weighted auxiliary losses in fp32 or wider (0 when no layer has one)."""
        losses = [o.aux_loss.to(torch.promote_types(o.aux_loss.dtype, torch.float32))
                  for o in self.layer_stats if o.aux_loss is not None]
        return torch.stack(losses).sum() if losses else self.logits.new_zeros((), dtype=torch.float32)
