"""``model.init=paper``: the σ-MoE paper's one scaled rule on every linear map of every variant and backbone.

Csordás et al. (2023) initialise the dense and the MoE models alike, so that σ-MoE starts exactly like its
dense baseline: every weight W [out, fan_in] ~ N(0, (s / √fan_in)²) with s = √(2 / n_layers), biases 0.
Here that covers attention, the dense and Top-K FFNs and the sMLP's projections (as ``nn.Linear``), every
router with its expert bank (``Router.paper_init_``: keys fan-in D; values fan-in N_E·G, the cells of the
dense layer they approximate; selectors with rows of equal norm; the paper's Switch baseline and σ-MoE's
"standard init" ablation differ as their routers say) and PKM's sub-keys and value table
(``ProductKeyMemory.paper_init_``). Embeddings (and a tied output layer) keep the backbone's own init.
``model.init=default`` keeps every module's own init (σ-MoE always initialises itself by the paper's rule).
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
            module.paper_init_(s)
