"""The block-sparse FFN: a router picks K of N_E expert blocks per token, the expert bank computes them."""

from __future__ import annotations

import torch
from torch import nn

from sffn_lab.config import FFNConfig
from sffn_lab.kernels import RoutingPlan
from sffn_lab.layers.ffn_output import FFNOutput
from sffn_lab.variants.registry import variant


class MoEFFN(nn.Module):
    """x [B, S, D] (token ids [B, S]) → ``FFNOutput`` with y [B, S, D] and expert counts [N_E]."""

    def __init__(self, cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int):
        """The variant ``cfg.kind`` (a ``RouterVariant``) makes the bank (the ``ExpertBank``, or a module with its
        interface: BASE's fairseq form's ``FairseqBaseExperts``) and its router, which initialises the bank."""
        super().__init__()
        kind = variant(cfg.kind)
        self.bank = kind.make_bank(cfg, d_model)
        self.router = kind.router_class()(cfg, d_model, n_layers, vocab_size)
        self.router.init_bank(self.bank)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> FFNOutput:
        B, S, D = x.shape
        flat = x.reshape(B * S, D)
        routing = self.router(flat, token_ids, self.bank)
        plan = RoutingPlan.of(routing.indices, self.bank.n_experts)
        y = self.bank(flat, plan, routing.gates)
        counts = plan.counts.float()
        gate_mean = routing.gates.detach().mean() if routing.gates is not None else None
        return FFNOutput(y=y.view(B, S, D), aux_loss=routing.aux_loss, expert_counts=counts, gate_mean=gate_mean)
