"""Parameters and FLOPs of every FFN variant from one function, and fair (param/compute-equal) sizes.

FLOPs are forward FLOPs per token with a multiply-add counted as 2. "Active" parameters are those a
single token touches. Routing costs (scores over N_E experts, PKM's sub-key scores) are included;
sorting and top-k selection are not (they are not multiply-adds).
"""

from __future__ import annotations

import dataclasses

from sffn_lab.config import FFNConfig
from sffn_lab.variants import Cost, kinds, variant


def count_ffn(cfg: FFNConfig, d_model: int) -> Cost:
    """Total and active parameters and forward FLOPs/token of one FFN layer built from ``cfg``."""
    return variant(cfg.kind).cost(cfg, d_model)


def param_equal(dense: FFNConfig, kind: str, d_model: int, **options) -> FFNConfig:
    """A ``kind`` FFN with (within 1%) the dense FFN's total parameters.

    Block variants keep N_E·G = d_ff (give ``expert_size`` or ``n_experts``, and ``top_k``);
    ``topk`` keeps d_ff; ``pkm`` picks n_keys² value rows and the query size to fill the budget.
    Other options are set on the result as ``model.ffn`` keys (e.g. ``sigma_moe=...``).
    """
    return variant(kind).param_equal(dataclasses.replace(dense, kind=kind, **options), dense, d_model, options)


def compute_equal(dense: FFNConfig, kind: str, d_model: int, **options) -> FFNConfig:
    """A ``kind`` FFN whose forward FLOPs/token match the dense FFN's (to the nearest size step).

    Block variants fix N_E and K and solve for G; ``pkm`` solves for the number of heads; ``topk`` computes
    every key, so it matches only at K = d_ff.
    """
    return variant(kind).compute_equal(dataclasses.replace(dense, kind=kind, **options), dense, d_model, options)


def variants_table(d_model: int, d_ff: int, expert_size: int = 128, top_k: int = 4) -> list[dict]:
    """One row per variant, parameter-equal to a dense FFN of width d_ff: sizes, params, FLOPs."""
    dense = FFNConfig(kind="dense", d_ff=d_ff)
    dense_cost = count_ffn(dense, d_model)
    rows = []
    for kind in kinds():
        cfg = param_equal(dense, kind, d_model, **variant(kind).table_options(expert_size, top_k))
        rows.append({"kind": kind, "sizes": ffn_sizes(cfg), **cost_columns(count_ffn(cfg, d_model), dense_cost)})
    return rows


def cost_columns(cost, dense_cost) -> dict:
    """Table columns of a cost (of a layer or a model), with FLOPs and parameters relative to dense."""
    return {
        "total_params": cost.total_params,
        "active_params": cost.active_params,
        "flops_per_token": cost.flops_per_token,
        "flops_vs_dense": cost.flops_per_token / dense_cost.flops_per_token,
        "params_vs_dense": cost.total_params / dense_cost.total_params,
    }


def ffn_sizes(cfg: FFNConfig) -> str:
    """The sizes that define an FFN layer, e.g. ``N_E=16 G=128 K=4`` or ``d_ff=2048``."""
    return variant(cfg.kind).sizes(cfg)
