"""The FFN factory: ``model.ffn.kind`` → a feed-forward layer.

Every layer has the signature ``forward(x [B, S, D], token_ids [B, S] | None) -> FFNOutput``; the kinds
and their validation live with the config (``sffn_lab.config.FFN_KINDS``, ``validate_ffn``).
"""

from __future__ import annotations

from torch import nn

from sffn_lab.config import FFNConfig
from sffn_lab.layers.dense import DenseFFN


def build_ffn(cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int) -> nn.Module:
    """One feed-forward layer for a model of width ``d_model``, depth ``n_layers`` and ``vocab_size`` token ids
    (HashLayer draws one expert list per id)."""
    if cfg.kind == "dense":
        return DenseFFN(d_model, cfg.d_ff, cfg.activation, cfg.dropout)
    if cfg.kind == "topk":
        from sffn_lab.layers.topk import TopKFFN

        return TopKFFN(d_model, cfg.d_ff, cfg.top_k, cfg.activation, cfg.dropout)
    if cfg.kind == "pkm":
        from sffn_lab.layers.pkm import ProductKeyMemory

        return ProductKeyMemory(d_model, cfg.pkm, cfg.dropout)
    from sffn_lab.layers.moe import MoEFFN

    if cfg.kind == "base" and cfg.base.form == "fairseq":
        from sffn_lab.layers.base_experts import FairseqBaseExperts

        bank = FairseqBaseExperts(d_model, cfg.n_experts, cfg.expert_size, cfg.activation, cfg.dropout)
        return MoEFFN(cfg, d_model, n_layers, vocab_size, bank)
    return MoEFFN(cfg, d_model, n_layers, vocab_size)
