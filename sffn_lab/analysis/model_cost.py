"""Total parameters, active parameters and forward FLOPs per token of a whole language model.

Total parameters are counted on the model itself, built on the meta device (no memory, no init). A token
does not touch the embedding rows of other tokens (untied input embedding, learned positions) nor the
parameters each FFN layer declares inactive (``Variant.inactive_params``). FLOPs: each FFN layer's as
measured from the built layer (``count_ffn``), plus the backbone's products written out below (embeddings,
attention or the sMLP's units); FLOPs count a multiply-add as 2 and are per token of a forward pass;
causal attention costs each token on average (S + 1) / 2 scores at context length S.
"""

from __future__ import annotations

import torch

from sffn_lab.analysis.accounting import Cost, count_ffn
from sffn_lab.config import ModelConfig, attention_head_dim


def count_model(cfg: ModelConfig, vocab_size: int, seq_len: int) -> Cost:
    """Costs of the model ``build_model(cfg, vocab_size, seq_len)`` would build."""
    from sffn_lab.models import build_model

    with torch.device("meta"):
        total = sum(p.numel() for p in build_model(cfg, vocab_size, seq_len).parameters())
    ffn = count_ffn(cfg.ffn, cfg.d_model)
    smlp = cfg.backbone == "smlp"
    n_ffn = cfg.smlp.n_sparse_blocks if smlp else cfg.n_layers
    unread = 0 if cfg.tie_embeddings else (vocab_size - 1) * cfg.d_model  # a tied input row is in the head
    if cfg.positions == "learned" and not smlp:
        unread += (seq_len - 1) * cfg.d_model
    active = total - unread - n_ffn * (ffn.total_params - ffn.active_params)
    flops = (smlp_flops if smlp else transformer_flops)(cfg, vocab_size, seq_len) + n_ffn * ffn.flops_per_token
    return Cost(int(total), int(active), int(flops))


def transformer_flops(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Forward FLOPs per token of the Transformer without its FFN layers: the output head, and per layer the
    q, k, v and output projections, the keys and values of any cached memory (Transformer-XL caches a layer's
    inputs, so each segment projects its M cached positions again: M / S of a k and v projection per token)
    and the attention scores (causal prefix and memory)."""
    d, inner = cfg.d_model, cfg.n_heads * attention_head_dim(cfg)  # H·Dh
    memory = cfg.memory_segments * seq_len  # cached positions every query also reads
    projection_flops = 2 * 4 * d * inner + 2 * 2 * d * inner * memory / seq_len
    score_flops = 2 * 2 * inner * (memory + (seq_len + 1) / 2)  # q·k and p·v over the memory and causal prefix
    if cfg.positions == "relative":  # (q + v)·W_r R over every offset, and W_r R once per segment
        score_flops += 2 * inner * (memory + seq_len) + 2 * d * inner * (memory + seq_len) / seq_len
    return 2 * vocab_size * d + cfg.n_layers * (projection_flops + score_flops)


def smlp_flops(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Forward FLOPs per token of ``SparseAllMLP`` without its FFN (tMoE) layers: the output head, every block's
    in/out projections and causal token mixing, the sparse blocks' partial-prediction router."""
    s, D, L = cfg.smlp, cfg.d_model, seq_len
    Fh = s.d_hidden
    unit_flops = 2 * D * 2 * Fh + Fh * (L + 1) + 2 * Fh * D  # causal mixing: (L+1)/2 terms on average
    prefix = int(s.prediction_fraction * L) if s.routing == "partial_prediction" else 0
    router_flops = 2 * Fh * prefix * s.n_chunks / L  # W_r [N, P] on each of the F channels, once per sequence
    return 2 * vocab_size * D + (s.n_dense_blocks + s.n_sparse_blocks) * unit_flops + s.n_sparse_blocks * router_flops
