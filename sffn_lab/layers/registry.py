"""The FFN factory: ``model.ffn.kind`` → a feed-forward layer, plus config-time validation.

Every layer has the signature ``forward(x [B, S, D], token_ids [B, S] | None) -> FFNOutput``.
"""

from __future__ import annotations

from torch import nn

from sffn_lab.config import FFNConfig
from sffn_lab.errors import UserError
from sffn_lab.layers.dense import ACTIVATIONS, DenseFFN

FFN_KINDS = ("dense",)


def validate_ffn(cfg: FFNConfig, d_model: int) -> None:
    """Reject impossible FFN settings with a message that says what to change."""
    if cfg.kind not in FFN_KINDS:
        import difflib

        close = difflib.get_close_matches(cfg.kind, FFN_KINDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"Unknown model.ffn.kind '{cfg.kind}'.{hint} Choose one of: {', '.join(FFN_KINDS)}.")
    if cfg.activation not in ACTIVATIONS:
        raise UserError(f"model.ffn.activation must be one of {sorted(ACTIVATIONS)}, got '{cfg.activation}'.")
    if cfg.d_ff < 1:
        raise UserError("model.ffn.d_ff must be positive.")


def build_ffn(cfg: FFNConfig, d_model: int, n_layers: int) -> nn.Module:
    """One feed-forward layer for a model of width ``d_model`` and depth ``n_layers``."""
    if cfg.kind == "dense":
        return DenseFFN(d_model, cfg.d_ff, cfg.activation, cfg.dropout)
    raise UserError(f"Unknown model.ffn.kind '{cfg.kind}'.")
