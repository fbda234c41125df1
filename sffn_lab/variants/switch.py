"""``switch``: Switch Transformer routing (Fedus et al. 2021): softmax gate, top-1, load-balancing loss."""

from __future__ import annotations

from dataclasses import dataclass

from sffn_lab.config import ModelConfig
from sffn_lab.errors import UserError
from sffn_lab.variants.bank import RouterVariant
from sffn_lab.variants.registry import register


@dataclass
class SwitchOptions:
    """Switch Transformer routing: softmax gate, top-1, load-balancing loss."""

    balance_coef: float = 0.01  # α of α·N·Σ f_i P_i (the σ-MoE paper's Switch: 0.01 / N², see paper grids)
    capacity_factor: float = 0.0  # 0 = unlimited; otherwise tokens beyond capacity are dropped
    init_scale: float = 0.1  # model.init=paper: every std times √init_scale (the σ-MoE paper's Switch: 0.1)


@register("switch")
class Switch(RouterVariant):
    """Switch: softmax gate, top-K (1 in the paper), balance loss α·N·Σ f_i P_i, optional capacity.

    ``model.init=paper`` gives it the σ-MoE paper's Switch baseline init: every std of the scaled rule times
    √init_scale (0.1 there), values with per-expert fan-in G, and a selector without row renormalisation.
    """

    Options = SwitchOptions
    table_top_k = 1

    @classmethod
    def router_class(cls) -> type:
        from sffn_lab.layers.routers import SwitchRouter

        return SwitchRouter

    @classmethod
    def check(cls, model: ModelConfig) -> None:
        super().check(model)
        if model.ffn.switch.capacity_factor < 0:
            raise UserError("model.ffn.switch.capacity_factor must be ≥ 0 (0: no capacity limit).")
        if model.ffn.switch.init_scale <= 0:
            raise UserError("model.ffn.switch.init_scale must be > 0.")
