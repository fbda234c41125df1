"""Shared causality check for language models: changing token t never changes any output before t."""

from __future__ import annotations

import torch
from torch import nn

# Outputs before t may differ by float rounding only: a change at t moves token t to another expert,
# so the per-expert matmuls of the other tokens run with different row counts (different BLAS
# blocking). A real leak moves a logit by orders of magnitude more than this.
ROUNDING = 1e-5


def assert_causal(model: nn.Module, tokens: torch.Tensor, t: int, vocab_size: int) -> None:
    """tokens [B, S]: change every sequence's token t; logits [:, :t] must stay put, [:, t] must move."""
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1 + torch.randint(0, vocab_size - 1, ())) % vocab_size
    with torch.no_grad():
        before, after = model(tokens).logits, model(changed).logits
    scale = before.abs().max()
    leak = float((before[:, :t] - after[:, :t]).abs().max()) if t else 0.0
    moved = float((before[:, t] - after[:, t]).abs().max())
    assert leak <= ROUNDING * scale, f"changing token {t} moved earlier logits by {leak:.2e}"
    assert moved > 1e3 * ROUNDING * scale, f"changing token {t} did not change its own logits ({moved:.2e})"
