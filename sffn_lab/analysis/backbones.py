"""The Transformer and the attention-free (s)MLP backbones side by side at equal total parameters.

The reference is a dense Transformer of ``n_layers`` layers. Its MoE versions keep the FFN's
parameter budget (N_E·G = d_ff); the gMLP and sMLP models get the hidden width ``model.smlp.d_hidden``
that brings their total parameters closest to the reference (the total is linear in it).
"""

from __future__ import annotations

import dataclasses

from sffn_lab.analysis.accounting import cost_columns, ffn_sizes, param_equal
from sffn_lab.analysis.model_cost import count_model
from sffn_lab.config import FFNConfig, ModelConfig, SMLPConfig


def smlp_hidden_for(cfg: ModelConfig, target_params: int, vocab_size: int, seq_len: int) -> int:
    """The d_hidden (a multiple of ``cfg.smlp.n_chunks``) whose sMLP total parameters are closest to target."""
    step = cfg.smlp.n_chunks

    def total(d_hidden: int) -> int:
        sized = dataclasses.replace(cfg, smlp=dataclasses.replace(cfg.smlp, d_hidden=d_hidden))
        return count_model(sized, vocab_size, seq_len).total_params

    at_one, per_step = total(step), total(2 * step) - total(step)
    return step * max(1, 1 + round((target_params - at_one) / per_step))


def backbones_table(d_model: int, d_ff: int, n_layers: int, seq_len: int, vocab_size: int,
                    expert_size: int = 128, top_k: int = 1) -> list[dict]:
    """One row per backbone (name, sizes, total/active params, FLOPs per token and vs the dense Transformer)."""
    dense_ffn = FFNConfig(kind="dense", d_ff=d_ff)
    moe = {kind: param_equal(dense_ffn, kind, d_model, expert_size=expert_size, top_k=top_k)
           for kind in ("switch", "base")}
    transformer = ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=max(1, d_model // 64), ffn=dense_ffn)
    n_sparse = n_layers // 2
    models = {
        "transformer dense": transformer,
        "transformer + switch": dataclasses.replace(transformer, ffn=moe["switch"]),
        "transformer + base": dataclasses.replace(transformer, ffn=moe["base"]),
        "gmlp": ModelConfig(backbone="smlp", d_model=d_model, ffn=dense_ffn,
                            smlp=SMLPConfig(n_dense_blocks=n_layers, n_sparse_blocks=0)),
        "smlp deterministic + base": ModelConfig(
            backbone="smlp", d_model=d_model, ffn=moe["base"],
            smlp=SMLPConfig(n_dense_blocks=n_layers - n_sparse, n_sparse_blocks=n_sparse)),
    }
    models["smlp partial prediction + base"] = dataclasses.replace(
        models["smlp deterministic + base"],
        smlp=dataclasses.replace(models["smlp deterministic + base"].smlp, routing="partial_prediction"))
    reference = count_model(transformer, vocab_size, seq_len)
    rows = []
    for name, cfg in models.items():
        if cfg.backbone == "smlp":
            hidden = smlp_hidden_for(cfg, reference.total_params, vocab_size, seq_len)
            cfg = dataclasses.replace(cfg, smlp=dataclasses.replace(cfg.smlp, d_hidden=hidden))
        rows.append({"backbone": name, "sizes": _sizes(cfg),
                     **cost_columns(count_model(cfg, vocab_size, seq_len), reference)})
    return rows


def _sizes(cfg: ModelConfig) -> str:
    ffn = ffn_sizes(cfg.ffn)
    if cfg.backbone != "smlp":
        return f"{cfg.n_layers} layers, FFN {ffn}"
    s = cfg.smlp
    if not s.n_sparse_blocks:
        return f"{s.n_dense_blocks} gMLP blocks, d_hidden={s.d_hidden}"
    return (f"{s.n_dense_blocks} gMLP + {s.n_sparse_blocks} sparse blocks, d_hidden={s.d_hidden}, "
            f"{s.n_chunks} sMoE experts, tMoE {ffn}")
