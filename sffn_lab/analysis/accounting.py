"""Parameters and FLOPs of every FFN variant from one function, and fair (param/compute-equal) sizes.

FLOPs are forward FLOPs per token with a multiply-add counted as 2. "Active" parameters are those a
single token touches. Routing costs (scores over N_E experts, PKM's sub-key scores) are included;
sorting and top-k selection are not (they are not multiply-adds).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from sffn_lab.config import BLOCK_KINDS, FFN_KINDS, FFNConfig, pkm_query_size
from sffn_lab.errors import UserError

LEARNED_ROUTERS = ("sigma_moe", "switch", "sbase", "base")


@dataclass(frozen=True)
class Cost:
    """Of one FFN layer or of a whole model."""

    total_params: int
    active_params: int  # parameters touched by one token (embedding: one row; experts: the selected ones)
    flops_per_token: int  # forward, a multiply-add counted as 2


def count_ffn(cfg: FFNConfig, d_model: int) -> Cost:
    """Total and active parameters and forward FLOPs/token of one FFN layer built from ``cfg``."""
    D = d_model
    if cfg.kind == "dense":
        params = 2 * D * cfg.d_ff + cfg.d_ff + D
        return Cost(params, params, 4 * D * cfg.d_ff)
    if cfg.kind == "topk":
        # every key (and its bias) is computed; only K value columns are read
        total = 2 * D * cfg.d_ff + cfg.d_ff + D
        active = D * cfg.d_ff + cfg.d_ff + cfg.top_k * D + D
        return Cost(total, active, 2 * D * cfg.d_ff + 2 * cfg.top_k * D)
    if cfg.kind in BLOCK_KINDS:
        E, G, K = cfg.n_experts, cfg.expert_size, cfg.top_k
        router = E * D if cfg.kind in LEARNED_ROUTERS else 0
        # Avg-K scores blocks against their mean keys (E·D multiply-adds), like a learned router
        router_flops = 2 * E * D if cfg.kind != "hash" else 0
        # BASE's fairseq form: each expert also has its LayerNorm (2D) and two biases (G + D); FLOPs count the
        # products only, as the dense FFN's do
        block = 2 * G * D + (G + 3 * D if cfg.kind == "base" and cfg.base.form == "fairseq" else 0)
        return Cost(E * block + router, K * block + router, 4 * K * G * D + router_flops)
    if cfg.kind == "pkm":
        p = cfg.pkm
        key_dim = pkm_query_size(p, D)
        query = D * p.heads * key_dim if p.query == "projection" else 0
        sub_keys = p.heads * p.n_keys * key_dim
        values = p.n_keys**2 * D
        if p.knn == 0:  # every slot: head-summed pair scores, then a dense read of the whole table
            return Cost(query + sub_keys + values, query + sub_keys + values,
                        2 * query + 2 * sub_keys + p.heads * p.n_keys**2 + 2 * values)
        active = query + sub_keys + p.heads * p.knn * D
        flops = 2 * query + 2 * sub_keys + p.heads * p.knn**2 + 2 * p.heads * p.knn * D
        return Cost(query + sub_keys + values, active, flops)
    raise UserError(f"Unknown model.ffn.kind '{cfg.kind}'.")


def param_equal(dense: FFNConfig, kind: str, d_model: int, **options) -> FFNConfig:
    """A ``kind`` FFN with (within 1%) the dense FFN's total parameters.

    Block variants keep N_E·G = d_ff (give ``expert_size`` or ``n_experts``, and ``top_k``);
    ``topk`` keeps d_ff; ``pkm`` picks n_keys² value rows and the query size to fill the budget.
    Other options are set on the result as ``model.ffn`` keys (e.g. ``sigma_moe=...``).
    """
    cfg = dataclasses.replace(dense, kind=kind, **options)
    if kind in BLOCK_KINDS:
        if "n_experts" in options and "expert_size" not in options:
            cfg = dataclasses.replace(cfg, expert_size=_exact_div(dense.d_ff, cfg.n_experts, "n_experts"))
        else:
            cfg = dataclasses.replace(cfg, n_experts=_exact_div(dense.d_ff, cfg.expert_size, "expert_size"))
    elif kind == "pkm":
        cfg = dataclasses.replace(cfg, pkm=_pkm_sizes(cfg, count_ffn(dense, d_model).total_params, d_model))
    elif kind not in ("dense", "topk"):
        raise UserError(f"Unknown FFN kind '{kind}'. Choose one of: {', '.join(FFN_KINDS)}.")
    return cfg


def compute_equal(dense: FFNConfig, kind: str, d_model: int, **options) -> FFNConfig:
    """A ``kind`` FFN whose forward FLOPs/token match the dense FFN's (to the nearest size step).

    Block variants fix N_E and K and solve for G; ``pkm`` solves for the number of heads; ``topk`` computes
    every key, so it matches only at K = d_ff.
    """
    target = count_ffn(dense, d_model).flops_per_token
    cfg = dataclasses.replace(dense, kind=kind, **options)
    if kind in BLOCK_KINDS:
        per_cell = count_ffn(dataclasses.replace(cfg, expert_size=1), d_model).flops_per_token
        router = count_ffn(dataclasses.replace(cfg, expert_size=0), d_model).flops_per_token
        size = max(1, round((target - router) / (per_cell - router)))
        return dataclasses.replace(cfg, expert_size=size)
    if kind == "topk":
        return dataclasses.replace(cfg, top_k=dense.d_ff)
    if kind == "pkm":
        one_head = dataclasses.replace(cfg, pkm=dataclasses.replace(cfg.pkm, heads=1))
        heads = max(1, round(target / count_ffn(one_head, d_model).flops_per_token))
        return dataclasses.replace(cfg, pkm=dataclasses.replace(cfg.pkm, heads=heads))
    return param_equal(dense, kind, d_model, **options)


def _exact_div(d_ff: int, size: int, name: str) -> int:
    if size < 1 or d_ff % size:
        raise UserError(
            f"Parameter-equal sizing needs N_E·G = d_ff, but {name}={size} does not divide d_ff={d_ff}. "
            f"Pick a divisor of {d_ff}."
        )
    return d_ff // size


def _pkm_sizes(cfg: FFNConfig, budget: int, d_model: int):
    """Largest n_keys that fits with the configured key_dim, then the even key_dim that fills the budget.

    knn is lowered to n_keys when the memory is too small for it. Total = n_keys²·D (values)
    + H·key_dim·(D + n_keys) (queries and sub-keys); with query=input: n_keys²·D + H·n_keys·D.
    """
    p, D = cfg.pkm, d_model
    if p.query == "input":  # no query projection, sub-keys of size D: n_keys²·D + H·n_keys·D = budget
        n_keys = int((-p.heads + math.sqrt(p.heads**2 + 4 * budget / D)) / 2)
        if n_keys < 1:
            raise UserError(f"No product-key memory fits the dense FFN's {budget:,} parameters.")
        return dataclasses.replace(p, n_keys=n_keys, knn=min(p.knn, n_keys))
    a, b, c = D, p.heads * p.key_dim, p.heads * p.key_dim * D - budget  # a·n² + b·n + c = 0
    n_keys = int((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)) if b * b - 4 * a * c >= 0 else 0
    if n_keys < 1:
        raise UserError(f"No product-key memory with key_dim={p.key_dim} fits the dense FFN's {budget:,} parameters.")
    key_dim = 2 * round((budget - n_keys**2 * D) / (p.heads * (D + n_keys)) / 2)
    return dataclasses.replace(p, n_keys=n_keys, key_dim=max(2, key_dim), knn=min(p.knn, n_keys))


def variants_table(d_model: int, d_ff: int, expert_size: int = 128, top_k: int = 4) -> list[dict]:
    """One row per variant, parameter-equal to a dense FFN of width d_ff: sizes, params, FLOPs."""
    dense = FFNConfig(kind="dense", d_ff=d_ff)
    dense_cost = count_ffn(dense, d_model)
    rows = []
    for kind in FFN_KINDS:
        options = {}
        if kind in BLOCK_KINDS:
            options = {"expert_size": expert_size, "top_k": 1 if kind in ("switch", "hash") else top_k}
        elif kind == "topk":
            options = {"top_k": top_k * expert_size}  # as many active cells as the block variants
        cfg = param_equal(dense, kind, d_model, **options)
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
    if cfg.kind in BLOCK_KINDS:
        return f"N_E={cfg.n_experts} G={cfg.expert_size} K={cfg.top_k}"
    if cfg.kind == "topk":
        return f"d_ff={cfg.d_ff} K={cfg.top_k}"
    if cfg.kind == "pkm":
        p = cfg.pkm
        return f"heads={p.heads} n_keys={p.n_keys} knn={p.knn} key_dim={p.key_dim}"
    return f"d_ff={cfg.d_ff}"
