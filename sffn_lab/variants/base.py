"""``base``: BASE layers (Lewis et al. 2021): the optimal balanced assignment in training, greedy top-K at eval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sffn_lab.config import FFNConfig, ModelConfig, choice
from sffn_lab.errors import UserError
from sffn_lab.variants.bank import RouterVariant
from sffn_lab.variants.registry import register


@dataclass
class BaseOptions:
    """BASE layers: the optimal balanced assignment in training (an auction), greedy top-K at eval. The fairseq
    form is fairseq's BaseLayer with one sublayer (K = 1 there; K > 1 sums the K experts' updates), applied to
    the block's LN(x) rather than the raw residual stream, every expert in one process."""

    form: str = "bank"  # "bank" (expert bank, σ(W_sel x) gates) or "fairseq" (BaseLayer: σ(x·c_e)·FFN_e(LN_e x))


@register("base")
class Base(RouterVariant):
    """BASE layers: the optimal balanced assignment in training (the auction of
    ``sffn_lab.layers.balanced_assignment``: every expert gets T·K/N_E tokens), greedy top-K at eval; gates
    σ(x·c_e) of the selector rows c_e (fairseq's expert centroids: orthogonal, gain 0.1, in the fairseq form)."""

    Options = BaseOptions
    host_syncs = "its balanced assignment is an auction whose rounds end on the unmet demand, read on the host"

    @classmethod
    def router_class(cls) -> type:
        from sffn_lab.layers.routers import BaseRouter

        return BaseRouter

    @classmethod
    def check(cls, model: ModelConfig) -> None:
        super().check(model)
        choice(model.ffn.base.form, ("bank", "fairseq"), "model.ffn.base.form")
        if model.ffn.base.form == "fairseq" and model.init == "paper":
            raise UserError("model.ffn.base.form=fairseq initialises as fairseq does (orthogonal centroids, a zero "
                            "second projection); use model.init=default with it, or model.ffn.base.form=bank.")

    @classmethod
    def make_bank(cls, cfg: FFNConfig, d_model: int) -> Any:
        if cfg.base.form == "fairseq":
            from sffn_lab.layers.base_experts import FairseqBaseExperts

            return FairseqBaseExperts(d_model, cfg.n_experts, cfg.expert_size, cfg.activation, cfg.dropout)
        return super().make_bank(cfg, d_model)
