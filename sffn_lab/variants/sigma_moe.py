"""``sigma_moe``: σ-MoE (Csordás et al. 2023): sigmoid gates on W_sel x, top-K experts, no renormalisation."""

from __future__ import annotations

from dataclasses import dataclass

from sffn_lab.config import ModelConfig, choice
from sffn_lab.errors import UserError
from sffn_lab.variants.bank import RouterVariant
from sffn_lab.variants.registry import register


@dataclass
class SigmaMoEOptions:
    """σ-MoE (Csordás et al. 2023): sigmoid gates on W_sel x, top-K experts, no renormalisation."""

    entropy_coef: float = 1e-3  # γ of the entropy regulariser on the batch-mean selection softmax
    expert_dropout: float = 0.0  # δ: probability of dropping a whole expert from selection (training)
    gate: str = "sigmoid"  # "sigmoid" (authors' sweeps: moe.selection_mode); "softmax", "softmax_topk" (the K), "none"
    renormalize: bool = False  # renormalise the K selected gates to sum to 1 (ablation)
    init: str = "paper"  # value fan-in N_E·G ("paper") or G ("standard": each expert as its own small FFN)


@register("sigma_moe")
class SigmaMoE(RouterVariant):
    """σ-MoE: top-K of W_sel x, sigmoid gates (not renormalised), entropy regulariser, expert dropout; the rule,
    expert dropout and init are stated once, on its router (``layers.routers.SigmaMoERouter``)."""

    Options = SigmaMoEOptions
    gates = ("sigmoid", "softmax", "softmax_topk", "none")

    @classmethod
    def router_class(cls) -> type:
        from sffn_lab.layers.routers import SigmaMoERouter

        return SigmaMoERouter

    @classmethod
    def check(cls, model: ModelConfig) -> None:
        super().check(model)
        cfg, o = model.ffn, model.ffn.sigma_moe
        choice(o.init, ("paper", "standard"), "model.ffn.sigma_moe.init")
        if not 0 <= o.expert_dropout < 1:
            raise UserError("model.ffn.sigma_moe.expert_dropout must be in [0, 1).")
        if o.expert_dropout > 0 and cfg.n_experts - cfg.top_k < 1:
            raise UserError("Expert dropout needs model.ffn.n_experts > model.ffn.top_k, or nothing is left to pick.")
