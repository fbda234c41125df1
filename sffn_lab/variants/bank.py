"""``RouterVariant``: the base of the variants that route each token to K of the N_E blocks of the expert bank.

Torch-free (a declaration: checks, accounting, how it builds); the router module itself derives from
``sffn_lab.layers.routers.Router``, which is a ``RouterVariant`` too, so that a plugin registers its
router class directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from sffn_lab.config import FFNConfig, ModelConfig
from sffn_lab.errors import UserError
from sffn_lab.variants.registry import Variant, variant


class RouterVariant(Variant):
    """An expert bank of ``model.ffn.n_experts`` blocks of ``expert_size`` cells and a router picking
    ``top_k`` of them per token (``build``: ``MoEFFN``, which makes both)."""

    uses_bank = True
    table_top_k: ClassVar[int | None] = None  # the K its paper routes with, for ``sffn variants`` (None: any)

    @classmethod
    def router_class(cls) -> type:
        """The router module (a ``sffn_lab.layers.routers.Router``), built from (cfg, d_model, n_layers, vocab)."""
        raise NotImplementedError

    @classmethod
    def check(cls, model: ModelConfig) -> None:
        cfg = model.ffn
        if cfg.n_experts < 1 or cfg.expert_size < 1:
            raise UserError("model.ffn.n_experts and model.ffn.expert_size must be positive.")
        if not 1 <= cfg.top_k <= cfg.n_experts:
            raise UserError(
                f"model.ffn.top_k ({cfg.top_k}) must be between 1 and model.ffn.n_experts ({cfg.n_experts}): "
                "a token cannot use more experts than exist."
            )
        super().check(model)

    @classmethod
    def make_bank(cls, cfg: FFNConfig, d_model: int) -> Any:
        """The expert bank this router routes to (or a module with its interface)."""
        from sffn_lab.layers.expert_bank import ExpertBank

        return ExpertBank(d_model, cfg.n_experts, cfg.expert_size, cfg.activation, cfg.dropout)

    @classmethod
    def build(cls, cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int) -> Any:
        from sffn_lab.layers.moe import MoEFFN

        return MoEFFN(cfg, d_model, n_layers, vocab_size)

    @classmethod
    def inactive_params(cls, cfg: FFNConfig, d_model: int, layer: Any) -> int:
        """The N_E − K experts a token is not routed to: that share of the expert bank's parameters (each has
        the N_E experts as its leading dimension)."""
        bank = sum(p.numel() for p in layer.bank.parameters())
        return bank * (cfg.n_experts - cfg.top_k) // cfg.n_experts

    @classmethod
    def sizes(cls, cfg: FFNConfig) -> str:
        return f"N_E={cfg.n_experts} G={cfg.expert_size} K={cfg.top_k}"

    @classmethod
    def describe(cls, cfg: FFNConfig) -> str:
        return f"{cfg.n_experts} experts of {cfg.expert_size} cells, {cfg.top_k} per token"

    @classmethod
    def table_options(cls, expert_size: int, top_k: int) -> dict:
        return {"expert_size": expert_size, "top_k": cls.table_top_k or top_k}

    @classmethod
    def param_equal(cls, cfg: FFNConfig, dense: FFNConfig, d_model: int, options: dict) -> FFNConfig:
        """N_E·G = d_ff: the given ``n_experts`` (then G follows) or ``expert_size`` (then N_E does)."""
        if "n_experts" in options and "expert_size" not in options:
            return dataclasses.replace(cfg, expert_size=_exact_div(dense.d_ff, cfg.n_experts, "n_experts"))
        return dataclasses.replace(cfg, n_experts=_exact_div(dense.d_ff, cfg.expert_size, "expert_size"))

    @classmethod
    def compute_equal(cls, cfg: FFNConfig, dense: FFNConfig, d_model: int, options: dict) -> FFNConfig:
        """N_E and K fixed, G solved for the dense FFN's FLOPs/token."""
        target = variant(dense.kind).cost(dense, d_model).flops_per_token
        one, two = (cls.cost(dataclasses.replace(cfg, expert_size=g), d_model).flops_per_token for g in (1, 2))
        per_cell = two - one  # FLOPs are linear in G: the experts' products, plus routing that does not depend on G
        return dataclasses.replace(cfg, expert_size=max(1, round((target - (one - per_cell)) / per_cell)))


def _exact_div(d_ff: int, size: int, name: str) -> int:
    if size < 1 or d_ff % size:
        raise UserError(
            f"Parameter-equal sizing needs N_E·G = d_ff, but {name}={size} does not divide d_ff={d_ff}. "
            f"Pick a divisor of {d_ff}."
        )
    return d_ff // size
