"""``topk``: the dense layer keeping only the K largest hidden activations per token (VanillaM as G = 1 blocks)."""

from __future__ import annotations

import dataclasses
from typing import Any

from sffn_lab.config import FFNConfig, ModelConfig
from sffn_lab.errors import UserError
from sffn_lab.variants.layer import Layer
from sffn_lab.variants.registry import register


@register("topk")
class TopK(Layer):
    @classmethod
    def check(cls, model: ModelConfig) -> None:
        cfg = model.ffn
        if not 1 <= cfg.top_k <= cfg.d_ff:
            raise UserError(f"model.ffn.top_k ({cfg.top_k}) must be between 1 and model.ffn.d_ff ({cfg.d_ff}).")

    @classmethod
    def build(cls, cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int) -> Any:
        from sffn_lab.layers.topk import TopKFFN

        return TopKFFN(d_model, cfg.d_ff, cfg.top_k, cfg.activation, cfg.dropout)

    @classmethod
    def inactive_params(cls, cfg: FFNConfig, d_model: int, layer: Any) -> int:
        """Every key (and its bias) is computed; only K of the d_ff value columns are read."""
        return (cfg.d_ff - cfg.top_k) * d_model

    @classmethod
    def uncounted_flops(cls, cfg: FFNConfig, d_model: int) -> int:
        """The layer multiplies the masked activations by the whole value matrix (2·d_ff·D); the method reads
        K value columns (2·K·D)."""
        return -2 * (cfg.d_ff - cfg.top_k) * d_model

    @classmethod
    def sizes(cls, cfg: FFNConfig) -> str:
        return f"d_ff={cfg.d_ff} K={cfg.top_k}"

    @classmethod
    def describe(cls, cfg: FFNConfig) -> str:
        return f"d_ff {cfg.d_ff}, top {cfg.top_k} cells per token"

    @classmethod
    def table_options(cls, expert_size: int, top_k: int) -> dict:
        return {"top_k": top_k * expert_size}  # as many active cells as the block variants

    @classmethod
    def compute_equal(cls, cfg: FFNConfig, dense: FFNConfig, d_model: int, options: dict) -> FFNConfig:
        """Top-K computes every key, so it matches the dense FLOPs only at K = d_ff."""
        return dataclasses.replace(cfg, top_k=dense.d_ff)
