"""Total parameters, active parameters and forward FLOPs per token of a whole language model.

The FFN part comes from ``count_ffn`` (one function for every variant); this module adds the
embeddings, attention and norms of the Transformer, or those of the sMLP backbone.
FLOPs count a multiply-add as 2 and are per token of a forward pass; causal attention costs each
token on average (S + 1) / 2 scores at context length S.
"""

from __future__ import annotations

from sffn_lab.analysis.accounting import Cost, count_ffn
from sffn_lab.config import ModelConfig, attention_head_dim


def count_model(cfg: ModelConfig, vocab_size: int, seq_len: int) -> Cost:
    """Costs of the model ``build_model(cfg, vocab_size, seq_len)`` would build."""
    if cfg.backbone == "smlp":
        return count_smlp(cfg, vocab_size, seq_len)
    d, n = cfg.d_model, cfg.n_layers
    ffn = count_ffn(cfg.ffn, d)
    inner = cfg.n_heads * attention_head_dim(cfg)  # H·Dh
    attention = 4 * d * inner + 3 * inner + d  # qkv and output projections with biases
    relative = cfg.positions == "relative"
    if relative:  # W_r and the two biases u, v
        attention += d * inner + 2 * inner
    norms = 2 * 2 * d
    embed = vocab_size * d
    positions = seq_len * d if cfg.positions == "learned" else 0
    head = 0 if cfg.tie_embeddings else vocab_size * d
    final_norm = 2 * d
    total = embed + positions + head + final_norm + n * (attention + norms + ffn.total_params)
    input_row = 0 if cfg.tie_embeddings else d  # a tied input row is part of the output matrix
    active = input_row + (d if positions else 0) + vocab_size * d + final_norm + n * (
        attention + norms + ffn.active_params
    )
    memory = cfg.memory_segments * seq_len  # cached positions every query also reads
    score_flops = 2 * 2 * inner * (memory + (seq_len + 1) / 2)  # q·k and p·v over the memory and causal prefix
    if relative:  # (q + v)·W_r R over every offset, and W_r R once per segment
        score_flops += 2 * inner * (memory + seq_len) + 2 * d * inner * (memory + seq_len) / seq_len
    flops = 2 * vocab_size * d + n * (2 * 4 * d * inner + score_flops + ffn.flops_per_token)
    return Cost(int(total), int(active), int(flops))


def count_smlp(cfg: ModelConfig, vocab_size: int, seq_len: int) -> Cost:
    """Total / active parameters and forward FLOPs per token of ``SparseAllMLP(cfg, vocab_size, seq_len)``."""
    s, D, L = cfg.smlp, cfg.d_model, seq_len
    Fh = s.d_hidden
    unit = 2 * D + (D * 2 * Fh + 2 * Fh) + 2 * Fh + (Fh * D + D)  # LN, in-proj, LN_v, out-proj
    unit_flops = 2 * D * 2 * Fh + Fh * (L + 1) + 2 * Fh * D  # causal mixing: (L+1)/2 terms on average
    mixing = (L * L if s.mixing == "full" else L) + L  # one mixing matrix's weight and bias
    dense_block = unit + mixing
    prefix = int(s.prediction_fraction * L) if s.routing == "partial_prediction" else 0
    router = prefix * s.n_chunks  # W_r [N, P], applied to each of the F channels once per sequence
    router_flops = 2 * Fh * router / L  # per token
    ffn = count_ffn(cfg.ffn, D)
    sparse_block = unit + s.n_chunks * mixing + router + 2 * D + ffn.total_params
    sparse_active = unit + s.n_chunks * mixing + router + 2 * D + ffn.active_params
    head = vocab_size * D
    embed = 0 if cfg.tie_embeddings else vocab_size * D  # tied: the output matrix is the embedding
    input_row = 0 if cfg.tie_embeddings else D  # a tied input row is part of the output matrix
    total = embed + head + 2 * D + s.n_dense_blocks * dense_block + s.n_sparse_blocks * sparse_block
    active = input_row + head + 2 * D + s.n_dense_blocks * dense_block + s.n_sparse_blocks * sparse_active
    flops = 2 * head + (s.n_dense_blocks + s.n_sparse_blocks) * unit_flops + s.n_sparse_blocks * (
        ffn.flops_per_token + router_flops
    )
    return Cost(int(total), int(active), int(flops))
