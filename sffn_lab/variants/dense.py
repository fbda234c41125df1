"""``dense``: the Transformer's feed-forward layer, y = W2 act(W1 x + b1) + b2 (the baseline every variant
is matched to)."""

from __future__ import annotations

from typing import Any

from sffn_lab.config import FFNConfig
from sffn_lab.variants.layer import Layer
from sffn_lab.variants.registry import register


@register("dense")
class Dense(Layer):
    @classmethod
    def build(cls, cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int) -> Any:
        from sffn_lab.layers.dense import DenseFFN

        return DenseFFN(d_model, cfg.d_ff, cfg.activation, cfg.dropout)
