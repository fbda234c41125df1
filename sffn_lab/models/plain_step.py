"""One optimizer step of a language model outside Lightning: for benchmarks, time estimates and the GPU check."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def plain_training_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
                        autocast_dtype: torch.dtype | None = None, grad_clip: float = 0.0) -> torch.Tensor:
    """tokens [B, S + 1] → next-token cross-entropy (nats, detached) after one step on it with the auxiliary
    losses added; the forward runs under autocast in ``autocast_dtype`` when given."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(inputs)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    (loss + out.aux_loss).backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()
