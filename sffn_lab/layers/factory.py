"""The FFN factory: ``model.ffn.kind`` → a feed-forward layer, built by the registered variant of that name.

Every layer has the signature ``forward(x [B, S, D], token_ids [B, S] | None) -> FFNOutput``; the kinds,
their options and their validation live with the variants (``sffn_lab.variants``).
"""

from __future__ import annotations

from torch import nn

from sffn_lab.config import FFNConfig
from sffn_lab.variants.registry import variant


def build_ffn(cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int) -> nn.Module:
    """One feed-forward layer for a model of width ``d_model``, depth ``n_layers`` and ``vocab_size`` token ids
    (HashLayer draws one expert list per id)."""
    return variant(cfg.kind).build(cfg, d_model, n_layers, vocab_size)
