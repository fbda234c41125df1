"""A decoder-only pre-LN Transformer language model with a pluggable feed-forward layer.

Read top to bottom: embeddings → n_layers × (LN → causal attention → residual, LN → FFN →
residual) → LN → tied output projection. The FFN of every block comes from ``build_ffn``, so
every S-FFN variant plugs in without touching this file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sffn_lab.config import ModelConfig, attention_head_dim
from sffn_lab.layers.factory import build_ffn
from sffn_lab.layers.ffn_output import FFNOutput
from sffn_lab.models.output import LMOutput


def rope_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [seq_len, head_dim / 2] for rotary position embeddings (base 10000)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x [B, H, S, Dh] by position; cos/sin [S, Dh/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: x [B, S, D] → [B, S, D] through H heads of size Dh (H·Dh may differ
    from D, as the σ-MoE paper's Transformer-XL projection size)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim)
        self.proj = nn.Linear(n_heads * head_dim, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-LN Transformer block; returns the new residual stream and the FFN's output record."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, attention_head_dim(cfg), cfg.attention_dropout)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = build_ffn(cfg.ffn, cfg.d_model, cfg.n_layers, vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, token_ids, rope) -> tuple[torch.Tensor, FFNOutput]:
        x = x + self.dropout(self.attn(self.ln_attn(x), rope))
        out = self.ffn(self.ln_ffn(x), token_ids)
        return x + self.dropout(out.y), out


class TransformerLM(nn.Module):
    """tokens [B, S] (S ≤ max_seq_len) → ``LMOutput`` with logits [B, S, vocab_size]."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, vocab_size) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.head_dim = attention_head_dim(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self._init_weights(cfg.n_layers)

    def _init_weights(self, n_layers: int) -> None:
        """GPT-2 style init of embeddings and attention; FFN layers keep their own init."""
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=0.02)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * n_layers))
            nn.init.zeros_(block.attn.proj.bias)

    def forward(self, tokens: torch.Tensor) -> LMOutput:
        S = tokens.shape[1]
        if S > self.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds the model's maximum {self.max_seq_len}")
        x = self.embed(tokens)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(S, device=tokens.device))
        else:
            rope = rope_tables(S, self.head_dim, tokens.device)
        x = self.drop(x)
        layer_stats = []
        for block in self.blocks:
            x, out = block(x, tokens, rope)
            layer_stats.append(out)
        return LMOutput(self.head(self.ln_out(x)), layer_stats)
