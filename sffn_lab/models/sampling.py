"""Autoregressive sampling for any backbone that returns an ``LMOutput``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SegmentCache:
    """A Transformer-XL model's cache while decoding: the states of the complete segments before ``start``
    (per layer [B, M, D]), as ``model(segment, memory).memory`` returns them."""

    memory: list[torch.Tensor] | None = None
    start: int = 0


def next_token_logits(model: nn.Module, tokens: torch.Tensor, max_seq_len: int,
                      cache: SegmentCache | None = None) -> torch.Tensor:
    """Logits [B, V] (fp32) of the token after ``tokens`` [B, S']. Without a cache the context is the last
    ``max_seq_len`` tokens; with one (a model with memory), the text is read in segments of ``max_seq_len``
    from its start, as its evaluation reads it: the current segment plus the cached earlier ones. Calls must
    come with ever longer ``tokens`` of the same text."""
    if cache is None:
        return model(tokens[:, -max_seq_len:]).logits[:, -1, :].float()
    while tokens.shape[1] - cache.start > max_seq_len:  # a complete segment before the last token: cache it
        cache.memory = model(tokens[:, cache.start : cache.start + max_seq_len], cache.memory).memory
        cache.start += max_seq_len
    return model(tokens[:, cache.start :], cache.memory).logits[:, -1, :].float()


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
    """Extend prompt [B, S0] by ``n_tokens`` sampled tokens → [B, S0 + n_tokens], each from
    ``next_token_logits`` (a model with memory keeps a ``SegmentCache``). temperature 0 means greedy decoding.
    """
    was_training = model.training
    model.eval()
    tokens = prompt
    cache = SegmentCache() if getattr(model, "memory_len", 0) else None
    for _ in range(n_tokens):
        logits = next_token_logits(model, tokens, max_seq_len, cache)
        if temperature <= 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            # in float64 (any positive Python float is nonzero there) and shifted so the largest is 0: a tiny
            # temperature sends the others to −inf and the largest stays 0, never inf − inf or 0 / 0
            logits = (logits - logits.amax(dim=-1, keepdim=True)).double() / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        tokens = torch.cat([tokens, next_token], dim=1)
    model.train(was_training)
    return tokens
