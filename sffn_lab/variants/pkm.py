"""``pkm``: product-key memory (Lample et al. 2019) and its ReLU variant (Csordás et al. 2023): sub-key tables
per head, top-k per half, cartesian top-k of the n_keys² value slots (the layer: ``sffn_lab.layers.pkm``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from sffn_lab.config import FFNConfig, ModelConfig, choice
from sffn_lab.errors import UserError
from sffn_lab.variants.layer import Layer
from sffn_lab.variants.registry import register, variant


@dataclass
class PKMOptions:
    """Product-key memory: sub-key tables per head, top-k per half, cartesian top-k."""

    heads: int = 4  # query heads, each selecting knn slots
    n_keys: int = 32  # sub-keys per half: the memory has n_keys² value slots
    knn: int = 32  # slots selected per head; 0: every slot, head scores summed (the σ-MoE paper's PKM runs)
    key_dim: int = 64  # query size per head (two halves of key_dim / 2); query=input: d_model
    activation: str = "softmax"  # "softmax" (original PKM) or "relu" (improved PKM)
    query: str = "projection"  # "projection" (a learned query per head) or "input" (the σ-MoE paper's PKM)
    normalize: str = "head"  # softmax over each head's knn slots ("head") or all heads' ("joint", σ-MoE paper)
    value_fan_in: str = "d_model"  # model.init=paper value std s/√D ("d_model") or s/n_keys ("slots": "init" variant)

    def query_size(self, d_model: int) -> int:
        """The size of each head's query: key_dim, or d_model when the heads query with the input itself."""
        return d_model if self.query == "input" else self.key_dim


@register("pkm")
class PKM(Layer):
    Options = PKMOptions

    @classmethod
    def check(cls, model: ModelConfig) -> None:
        p = model.ffn.pkm
        choice(p.activation, ("softmax", "relu"), "model.ffn.pkm.activation")
        choice(p.query, ("projection", "input"), "model.ffn.pkm.query")
        choice(p.normalize, ("head", "joint"), "model.ffn.pkm.normalize")
        choice(p.value_fan_in, ("d_model", "slots"), "model.ffn.pkm.value_fan_in")
        if p.heads < 1 or p.key_dim < 2 or p.key_dim % 2:
            raise UserError("model.ffn.pkm needs heads ≥ 1 and an even key_dim ≥ 2.")
        if p.query == "input" and model.d_model % 2:
            raise UserError(f"model.ffn.pkm.query=input splits d_model ({model.d_model}) in halves: it must be "
                            "even (or query with a projection: model.ffn.pkm.query=projection).")
        if not 0 <= p.knn <= p.n_keys:
            raise UserError(
                f"model.ffn.pkm.knn ({p.knn}) must be between 1 and model.ffn.pkm.n_keys ({p.n_keys}): each half "
                "selects knn of its n_keys sub-keys (or 0: read every slot)."
            )

    @classmethod
    def build(cls, cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int) -> Any:
        from sffn_lab.layers.pkm import ProductKeyMemory

        return ProductKeyMemory(d_model, cfg.pkm, cfg.dropout)

    @classmethod
    def inactive_params(cls, cfg: FFNConfig, d_model: int, layer: Any) -> int:
        """Each head reads knn value rows of the n_keys² (knn 0: every row, all active)."""
        p = cfg.pkm
        return 0 if p.knn == 0 else layer.values.numel() - p.heads * p.knn * d_model

    @classmethod
    def uncounted_flops(cls, cfg: FFNConfig, d_model: int) -> int:
        """The pair scores are sums (knn² per head, or n_keys² summed over heads when every slot is read),
        counted one FLOP each; the knn-row read is an embedding-bag (2·knn·D per head), which the counter has
        no formula for. The dense read of every slot is a matrix product, counted."""
        p = cfg.pkm
        if p.knn == 0:
            return p.heads * p.n_keys**2
        return p.heads * p.knn**2 + 2 * p.heads * p.knn * d_model

    @classmethod
    def sizes(cls, cfg: FFNConfig) -> str:
        p = cfg.pkm
        return f"heads={p.heads} n_keys={p.n_keys} knn={p.knn} key_dim={p.key_dim}"

    @classmethod
    def describe(cls, cfg: FFNConfig) -> str:
        return f"{cfg.pkm.heads} heads, {cfg.pkm.n_keys}² keys, {cfg.pkm.knn} read per head"

    @classmethod
    def param_equal(cls, cfg: FFNConfig, dense: FFNConfig, d_model: int, options: dict) -> FFNConfig:
        """n_keys² value rows and the query size that fill the dense FFN's parameters."""
        budget = variant(dense.kind).cost(dense, d_model).total_params
        return dataclasses.replace(cfg, pkm=_sizes(cfg.pkm, budget, d_model))

    @classmethod
    def compute_equal(cls, cfg: FFNConfig, dense: FFNConfig, d_model: int, options: dict) -> FFNConfig:
        """The number of heads that matches the dense FFN's FLOPs/token."""
        target = variant(dense.kind).cost(dense, d_model).flops_per_token
        single = dataclasses.replace(cfg, pkm=dataclasses.replace(cfg.pkm, heads=1))
        one_head = cls.cost(single, d_model).flops_per_token
        return dataclasses.replace(cfg, pkm=dataclasses.replace(cfg.pkm, heads=max(1, round(target / one_head))))


def _sizes(p: PKMOptions, budget: int, d_model: int) -> PKMOptions:
    """Largest n_keys that fits with the configured key_dim, then the even key_dim that fills the budget.

    knn is lowered to n_keys when the memory is too small for it. Total = n_keys²·D (values)
    + H·key_dim·(D + n_keys) (queries and sub-keys); with query=input: n_keys²·D + H·n_keys·D.
    """
    D = d_model
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
