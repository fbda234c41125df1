"""``model.init=paper``: the σ-MoE paper's one scaled rule on every linear map of every variant and backbone.

Csordás et al. (2023) initialise the dense and the MoE models alike, so that σ-MoE starts exactly like its
dense baseline: every weight W [out, fan_in] ~ N(0, (s / √fan_in)²) with s = √(2 / n_layers), biases 0.
Here that covers attention, the dense and Top-K FFNs, the sMLP's projections, the expert banks (keys:
fan-in D; values: fan-in N_E·G, the cells of the dense layer they approximate), the routers' selection
matrices (rows then given equal norms, as the paper's selector init) and PKM's value table (fan-in D, as
the paper's PKM). σ-MoE layers keep the init their ``model.ffn.sigma_moe.init`` chose (the paper's, or the
"standard init" ablation). Embeddings (and a tied output layer) keep the backbone's own init.
``model.init=default`` keeps every module's own init.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sffn_lab.layers.moe import MoEFFN
from sffn_lab.layers.pkm import ProductKeyMemory


@torch.no_grad()
def apply_paper_init(model: nn.Module, n_layers: int) -> None:
    """Re-initialise ``model`` in place by the paper's rule for a network of ``n_layers`` layers."""
    s = math.sqrt(2 / n_layers)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in tied:
            nn.init.normal_(module.weight, std=s / math.sqrt(module.in_features))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MoEFFN):
            module.router.paper_init_(module.bank, s)
        elif isinstance(module, ProductKeyMemory):
            nn.init.normal_(module.values, std=s / math.sqrt(module.values.shape[1]))
