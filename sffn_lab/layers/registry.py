"""The FFN factory: ``model.ffn.kind`` → a feed-forward layer, plus config-time validation.

Every layer has the signature ``forward(x [B, S, D], token_ids [B, S] | None) -> FFNOutput``.
"""

from __future__ import annotations

import difflib

from torch import nn

from sffn_lab.config import FFNConfig
from sffn_lab.errors import UserError
from sffn_lab.layers.dense import ACTIVATIONS, DenseFFN

BLOCK_KINDS = ("sigma_moe", "switch", "sbase", "base", "hash", "avgk")  # expert bank + router
FFN_KINDS = ("dense", "topk", *BLOCK_KINDS, "pkm")
GATES = {"sigma_moe": ("sigmoid", "softmax", "none"), "avgk": ("none", "softmax", "sigmoid")}


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        close = difflib.get_close_matches(value, options, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"Unknown {key} '{value}'.{hint} Choose one of: {', '.join(options)}.")


def validate_ffn(cfg: FFNConfig, d_model: int) -> None:
    """Reject impossible FFN settings with a message that says what to change."""
    _choice(cfg.kind, FFN_KINDS, "model.ffn.kind")
    _choice(cfg.activation, tuple(ACTIVATIONS), "model.ffn.activation")
    if cfg.d_ff < 1 or not 0 <= cfg.dropout < 1:
        raise UserError("model.ffn.d_ff must be positive and model.ffn.dropout in [0, 1).")
    if cfg.kind == "topk" and not 1 <= cfg.top_k <= cfg.d_ff:
        raise UserError(f"model.ffn.top_k ({cfg.top_k}) must be between 1 and model.ffn.d_ff ({cfg.d_ff}).")
    if cfg.kind in BLOCK_KINDS:
        if cfg.n_experts < 1 or cfg.expert_size < 1:
            raise UserError("model.ffn.n_experts and model.ffn.expert_size must be positive.")
        if not 1 <= cfg.top_k <= cfg.n_experts:
            raise UserError(
                f"model.ffn.top_k ({cfg.top_k}) must be between 1 and model.ffn.n_experts ({cfg.n_experts}): "
                "a token cannot use more experts than exist."
            )
    if cfg.kind in GATES:
        _choice(getattr(cfg, cfg.kind).gate, GATES[cfg.kind], f"model.ffn.{cfg.kind}.gate")
    if cfg.kind == "sigma_moe":
        o = cfg.sigma_moe
        _choice(o.init, ("paper", "standard"), "model.ffn.sigma_moe.init")
        if not 0 <= o.expert_dropout < 1:
            raise UserError("model.ffn.sigma_moe.expert_dropout must be in [0, 1).")
        if o.expert_dropout > 0 and cfg.n_experts - cfg.top_k < 1:
            raise UserError("Expert dropout needs model.ffn.n_experts > model.ffn.top_k, or nothing is left to pick.")
    if cfg.kind == "switch" and cfg.switch.capacity_factor < 0:
        raise UserError("model.ffn.switch.capacity_factor must be ≥ 0 (0: no capacity limit).")
    if cfg.kind == "sbase" and cfg.sbase.sinkhorn_iters < 1:
        raise UserError("model.ffn.sbase.sinkhorn_iters must be at least 1.")
    if cfg.kind == "pkm":
        p = cfg.pkm
        _choice(p.activation, ("softmax", "relu"), "model.ffn.pkm.activation")
        if p.heads < 1 or p.key_dim < 2 or p.key_dim % 2:
            raise UserError("model.ffn.pkm needs heads ≥ 1 and an even key_dim ≥ 2.")
        if not 1 <= p.knn <= p.n_keys:
            raise UserError(
                f"model.ffn.pkm.knn ({p.knn}) must be between 1 and model.ffn.pkm.n_keys ({p.n_keys}): each half "
                "selects knn of its n_keys sub-keys."
            )


def build_ffn(cfg: FFNConfig, d_model: int, n_layers: int) -> nn.Module:
    """One feed-forward layer for a model of width ``d_model`` and depth ``n_layers``."""
    if cfg.kind == "dense":
        return DenseFFN(d_model, cfg.d_ff, cfg.activation, cfg.dropout)
    if cfg.kind == "topk":
        from sffn_lab.layers.topk import TopKFFN

        return TopKFFN(d_model, cfg.d_ff, cfg.top_k, cfg.activation, cfg.dropout)
    if cfg.kind == "pkm":
        from sffn_lab.layers.pkm import ProductKeyMemory

        return ProductKeyMemory(d_model, cfg.pkm, cfg.dropout)
    from sffn_lab.layers.moe import MoEFFN

    return MoEFFN(cfg, d_model, n_layers)
