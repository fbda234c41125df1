"""Backbones: ``build_model`` picks the Transformer or the sMLP (``model.backbone``), then applies ``model.init``."""

from __future__ import annotations

from torch import nn

from sffn_lab.config import ModelConfig


def build_model(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> nn.Module:
    """A language model mapping tokens [B, S] to an ``LMOutput``, initialised as ``cfg.init`` says."""
    if cfg.backbone == "smlp":
        from sffn_lab.models.smlp import SparseAllMLP

        model = SparseAllMLP(cfg, vocab_size, max_seq_len)
        depth = cfg.smlp.n_dense_blocks + cfg.smlp.n_sparse_blocks
    else:
        from sffn_lab.models.transformer import TransformerLM

        model, depth = TransformerLM(cfg, vocab_size, max_seq_len), cfg.n_layers
    if cfg.init == "paper":
        from sffn_lab.models.init import apply_paper_init

        apply_paper_init(model, depth)
    return model
