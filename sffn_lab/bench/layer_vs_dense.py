"""Bench section "layer": the σ-MoE layer against its parameter-equal dense FFN (d_ff = N_E·G) and against its
limit, the FLOP-matched dense FFN (d_ff = K·G): forward+backward time, activation memory.
"""

from __future__ import annotations

import torch

from sffn_lab.analysis.accounting import param_equal
from sffn_lab.analysis.saved_memory import METHOD, saved_tensor_bytes
from sffn_lab.bench.records import Measurement, with_ratios
from sffn_lab.bench.sizes import BenchSizes
from sffn_lab.bench.timing import interleaved_medians
from sffn_lab.config import FFNConfig
from sffn_lab.layers.factory import build_ffn

FLOP_MATCHED = "dense, FLOP-matched (d_ff = K·G)"


def layer_vs_dense(sizes: BenchSizes) -> list[Measurement]:
    D = sizes.d_model
    dense_cfg = FFNConfig(kind="dense", d_ff=sizes.d_ff)
    moe_cfg = param_equal(dense_cfg, "sigma_moe", D, expert_size=sizes.expert_size, top_k=sizes.top_k)
    flop_cfg = FFNConfig(kind="dense", d_ff=sizes.top_k * sizes.expert_size)
    layers = {"dense": build_ffn(dense_cfg, D, 1, vocab_size=1),  # no HashLayer here: no token ids
              "sigma_moe": build_ffn(moe_cfg, D, 1, vocab_size=1),
              FLOP_MATCHED: build_ffn(flop_cfg, D, 1, vocab_size=1)}
    x = torch.randn(1, sizes.tokens, D, requires_grad=True)
    grad_y = torch.randn_like(x)

    def fwd_bwd(layer):
        def step():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            out = layer(x)
            loss = (out.y * grad_y).sum() + (out.aux_loss if out.aux_loss is not None else 0)
            loss.backward()

        return step

    seconds = interleaved_medians({name: fwd_bwd(layer) for name, layer in layers.items()}, sizes.repeats)
    case = sizes.case()
    rows = [Measurement("layer", case, name, "time_ms", seconds[name] * 1e3, note="forward+backward, fp32")
            for name in layers]
    for name, layer in layers.items():
        saved = saved_tensor_bytes(lambda layer=layer: layer(x), layer.parameters())
        rows.append(Measurement("layer", case, name, "activation_MB", saved / 2**20, note=METHOD))
    return with_ratios(rows, "dense")
