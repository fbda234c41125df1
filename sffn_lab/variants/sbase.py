"""``sbase``: S-BASE (Clark et al. 2022): Sinkhorn-balanced selection in training, top-K of the logits at eval."""

from __future__ import annotations

from dataclasses import dataclass

from sffn_lab.config import ModelConfig
from sffn_lab.errors import UserError
from sffn_lab.variants.bank import RouterVariant
from sffn_lab.variants.registry import register


@dataclass
class SBaseOptions:
    """S-BASE: Sinkhorn-balanced selection in training, top-K of the logits at eval."""

    sinkhorn_iters: int = 3  # Sinkhorn normalisation rounds per training batch
    entropy_coef: float = 0.0  # γ entropy regulariser as in σ-MoE (the σ-MoE paper's S-BASE: its γ)
    expert_dropout: float = 0.0  # δ as in σ-MoE (the σ-MoE paper's S-BASE: its δ)


@register("sbase")
class SBase(RouterVariant):
    """S-BASE: Sinkhorn-balanced top-K in training, top-K of the logits at eval, sigmoid gates of the logits;
    optionally σ-MoE's entropy regulariser and expert dropout (the σ-MoE paper's S-BASE uses both). A
    dropped expert leaves the balanced selection; as in the authors' code it keeps its gate when it must
    still be picked (fewer than K left): github RobertCsordas/moe, layers/moe_layer.py lines 657-677 at
    6b175aa ("sinkmoid": dropped scores set to −inf, the gates re-read from the raw scores after top-K)."""

    Options = SBaseOptions

    @classmethod
    def router_class(cls) -> type:
        from sffn_lab.layers.routers import SBaseRouter

        return SBaseRouter

    @classmethod
    def check(cls, model: ModelConfig) -> None:
        super().check(model)
        if model.ffn.sbase.sinkhorn_iters < 1:
            raise UserError("model.ffn.sbase.sinkhorn_iters must be at least 1.")
        if not 0 <= model.ffn.sbase.expert_dropout < 1:
            raise UserError("model.ffn.sbase.expert_dropout must be in [0, 1).")
