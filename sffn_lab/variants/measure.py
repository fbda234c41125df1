"""A layer's cost measured from the layer itself: what ``Variant.cost`` returns unless a variant overrides it.

Total parameters are counted on the module as built (on the CPU, fp32: ``Variant.build``). Forward FLOPs per
token come from one forward pass of a probe batch in evaluation mode under ``torch.utils.flop_counter``'s
``FlopCounterMode`` (matrix products, multiply-add = 2; elementwise work, sorting and top-k not counted), on the
PyTorch expert path, whose per-expert products the counter sees one by one. What the counter cannot know, the
variant declares beside its code:

- ``inactive_params(cfg, d_model, layer)``: parameters a single token does not touch (the unselected experts, the
  value rows a top-k does not read): a data-dependent choice, not visible in one batch's operations;
- ``uncounted_flops(cfg, d_model)``: per-token FLOPs the counter misses (positive: PKM's weighted reads of value
  rows, an embedding-bag the counter has no formula for) or that the code spends beyond what the method needs
  (negative: Top-K computes its value product densely and masks it, the method reads K columns).

So a plugin's router, with whatever routing products it has, is counted without writing a formula.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from sffn_lab.config import FFNConfig
from sffn_lab.kernels.backends import forced_backend
from sffn_lab.variants.cost import Cost

PROBE_BATCH, PROBE_LEN, PROBE_VOCAB = 2, 32, 512  # the probe batch: [B, S] token ids, x [B, S, D]
_MEASURED: dict[tuple, tuple[int, int, float]] = {}  # (variant, repr(cfg), d_model) → what the layer showed


def measure(variant: Any, cfg: FFNConfig, d_model: int) -> Cost:
    """The cost of one layer of ``variant`` built from ``cfg`` (measured once per variant, config and width)."""
    key = (variant, repr(cfg), d_model)
    if key not in _MEASURED:
        _MEASURED[key] = _measure(variant, cfg, d_model)
    total, inactive, counted = _MEASURED[key]
    return Cost(total, total - inactive, round(counted + variant.uncounted_flops(cfg, d_model)))


def _measure(variant: Any, cfg: FFNConfig, d_model: int) -> tuple[int, int, float]:
    """(total parameters, inactive parameters, counted forward FLOPs per token) of one built layer."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(0)
        layer = variant.build(cfg, d_model, n_layers=1, vocab_size=PROBE_VOCAB).eval()
    total = sum(p.numel() for p in layer.parameters())
    x = torch.randn(PROBE_BATCH, PROBE_LEN, d_model, generator=generator)
    ids = torch.randint(0, PROBE_VOCAB, (PROBE_BATCH, PROBE_LEN), generator=generator)
    with torch.no_grad(), forced_backend("torch"), FlopCounterMode(display=False) as counter:
        layer(x, ids)
    return total, variant.inactive_params(cfg, d_model, layer), counter.get_total_flops() / (PROBE_BATCH * PROBE_LEN)
