"""Total parameters, active parameters and forward FLOPs per token of a whole language model.

The FFN part comes from ``count_ffn`` (one function for every variant); this module adds the
embeddings, attention and norms of the Transformer, or delegates to the sMLP's own count.
FLOPs count a multiply-add as 2 and are per token of a forward pass; causal attention costs each
token on average (S + 1) / 2 scores at context length S.
"""

from __future__ import annotations

from dataclasses import dataclass

from sffn_lab.analysis.accounting import count_ffn
from sffn_lab.config import ModelConfig


@dataclass
class ModelCost:
    total_params: int
    active_params: int  # parameters touched by one token (embedding: one row; experts: the selected ones)
    flops_per_token: int


def count_model(cfg: ModelConfig, vocab_size: int, seq_len: int) -> ModelCost:
    """Costs of the model ``build_model(cfg, vocab_size, seq_len)`` would build."""
    if cfg.backbone == "smlp":
        from sffn_lab.models.smlp import count_smlp

        return count_smlp(cfg, vocab_size, seq_len)
    d, n = cfg.d_model, cfg.n_layers
    ffn = count_ffn(cfg.ffn, d)
    attention = 4 * d * d + 4 * d  # qkv and output projections with biases
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
    score_flops = 2 * 2 * d * (seq_len + 1) / 2  # q·k and p·v over the causal prefix
    flops = 2 * vocab_size * d + n * (2 * 4 * d * d + score_flops + ffn.flops_per_token)
    return ModelCost(int(total), int(active), int(flops))
