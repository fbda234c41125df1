"""Backbones: ``build_model`` picks the Transformer or the sMLP from ``model.backbone``."""

from __future__ import annotations

from torch import nn

from sffn_lab.config import ModelConfig


def build_model(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> nn.Module:
    """A language model mapping tokens [B, S] to an ``LMOutput``."""
    if cfg.backbone == "smlp":
        from sffn_lab.models.smlp import SparseAllMLP

        return SparseAllMLP(cfg, vocab_size, max_seq_len)
    from sffn_lab.models.transformer import TransformerLM

    return TransformerLM(cfg, vocab_size, max_seq_len)
