"""Autoregressive sampling for any backbone that returns an ``LMOutput``."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    n_tokens: int,
    max_seq_len: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend prompt [B, S0] by ``n_tokens`` sampled tokens → [B, S0 + n_tokens].

    The context is cropped to the last ``max_seq_len`` tokens. temperature 0 means greedy decoding.
    """
    was_training = model.training
    model.eval()
    tokens = prompt
    for _ in range(n_tokens):
        logits = model(tokens[:, -max_seq_len:]).logits[:, -1, :].float()
        if temperature <= 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        tokens = torch.cat([tokens, next_token], dim=1)
    model.train(was_training)
    return tokens
