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


def _angles(length: int, dim: int, device=None) -> torch.Tensor:
    """position × frequency angles [length, dim / 2], frequencies 10000^(−2i/dim) (RoPE's and Transformer-XL's)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    return torch.outer(torch.arange(length, device=device).float(), inv_freq)


def rope_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [seq_len, head_dim / 2] for rotary position embeddings (base 10000)."""
    angles = _angles(seq_len, head_dim, device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x [B, H, S, Dh] by position; cos/sin [S, Dh/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def relative_sinusoids(length: int, d_model: int, device=None) -> torch.Tensor:
    """Transformer-XL's sinusoidal embedding of the offsets 0 … length − 1: [length, d_model] (sin | cos)."""
    angles = _angles(length, d_model, device)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention of S queries over M cached + S new positions: x [B, S, D] and
    context [B, M + S, D] (the memory, then x; both layer-normalised) → [B, S, D], through H heads of size
    Dh (H·Dh may differ from D, as the σ-MoE paper's Transformer-XL projection size).

    Positions: RoPE tables (cos, sin) [M + S, Dh / 2]; or, with ``relative``, Transformer-XL's relative
    attention: score(i, j) = (q_i + u)·k_j + (q_i + v)·W_r R[i − j], R the offsets' sinusoids [M + S, D]
    and u, v [H, Dh] learned (per layer); or None (learned absolute positions were added to the input).
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, dropout: float, relative: bool = False):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim)
        self.proj = nn.Linear(n_heads * head_dim, d_model)
        self.dropout = dropout
        self.relative = relative
        if relative:
            self.pos_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)  # W_r
            self.content_bias = nn.Parameter(torch.zeros(n_heads, head_dim))  # u
            self.position_bias = nn.Parameter(torch.zeros(n_heads, head_dim))  # v

    def forward(self, x: torch.Tensor, context: torch.Tensor, positions) -> torch.Tensor:
        B, S, _ = x.shape
        L = context.shape[1]  # M + S keys
        inner = self.n_heads * self.head_dim
        if L == S:  # no memory (x is the context): one fused product
            q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:  # queries of the S new positions, keys and values of all M + S
            q = F.linear(x, self.qkv.weight[:inner], self.qkv.bias[:inner]).view(B, S, self.n_heads, self.head_dim)
            q = q.transpose(1, 2)  # [B, H, S, Dh]
            k, v = F.linear(context, self.qkv.weight[inner:], self.qkv.bias[inner:]).view(
                B, L, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if self.relative:
            bias = self.relative_scores(q, positions) / math.sqrt(self.head_dim)
            q = q + self.content_bias[:, None, :].to(q.dtype)  # q, k, v in one dtype: the fused kernels take them
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        else:
            if positions is not None:
                cos, sin = positions
                q, k = apply_rope(q, cos[L - S:], sin[L - S:]), apply_rope(k, cos, sin)
            mask = causal_mask(S, L, q)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, S, inner))

    def relative_scores(self, q: torch.Tensor, sinusoids: torch.Tensor) -> torch.Tensor:
        """(q_i + v)·W_r R[i − j] for query i (position M + i) and key j; −inf where j is in i's future.
        q [B, H, S, Dh], sinusoids [L, D] (offsets 0 … L − 1, L = M + S keys) → [B, H, S, L]."""
        B, H, S, Dh = q.shape
        L = sinusoids.shape[0]
        r = self.pos_proj(sinusoids.to(q.dtype)).view(L, H, Dh)
        by_offset = torch.einsum("bhsd,lhd->bhsl", q + self.position_bias[:, None, :].to(q.dtype), r)  # [B, H, S, L]
        offset = torch.arange(L - S, L, device=q.device)[:, None] - torch.arange(L, device=q.device)[None, :]
        scores = by_offset.gather(-1, offset.clamp(min=0).expand(B, H, S, L))
        return scores.masked_fill(offset < 0, float("-inf"))


def causal_mask(S: int, L: int, like: torch.Tensor) -> torch.Tensor | None:
    """Boolean [S, L]: query i (position L − S + i) sees keys 0 … L − S + i; None when L = S (SDPA's own)."""
    if L == S:
        return None
    return torch.ones(S, L, dtype=torch.bool, device=like.device).tril(L - S)


class Block(nn.Module):
    """Pre-LN Transformer block; returns the new residual stream and the FFN's output record."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, attention_head_dim(cfg), cfg.attention_dropout,
                                        relative=cfg.positions == "relative")
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = build_ffn(cfg.ffn, cfg.d_model, cfg.n_layers, vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, inputs, token_ids, positions) -> tuple[torch.Tensor, FFNOutput]:
        """inputs [B, M + S, D]: this layer's inputs at the M cached positions (no gradient), then at the S
        positions of token_ids [B, S] → the new residual stream [B, S, D] and the FFN's output."""
        S = token_ids.shape[1]
        context = self.ln_attn(inputs)
        x = inputs[:, -S:] + self.dropout(self.attn(context[:, -S:], context, positions))
        out = self.ffn(self.ln_ffn(x), token_ids)
        return x + self.dropout(out.y), out


class TransformerLM(nn.Module):
    """tokens [B, S] (S ≤ max_seq_len) → ``LMOutput`` with logits [B, S, vocab_size]."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.relative = cfg.positions == "relative"
        self.memory_len = cfg.memory_segments * max_seq_len  # M: cached positions per layer
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
            if block.attn.relative:
                nn.init.normal_(block.attn.pos_proj.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, memory: list[torch.Tensor] | None = None) -> LMOutput:
        """tokens [B, S]; memory: per layer, its inputs at the M previous positions [B, M, D] (Transformer-XL,
        ``model.memory_segments``), or None. The output's ``memory`` holds the last memory_segments · max_seq_len
        positions of each layer's input (detached) for the next segment."""
        S = tokens.shape[1]
        if S > self.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds the model's maximum {self.max_seq_len}")
        M = memory[0].shape[1] if memory else 0
        x = self.embed(tokens)
        positions = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(S, device=tokens.device))
        elif self.relative:
            positions = relative_sinusoids(M + S, x.shape[-1], tokens.device)
        else:
            positions = rope_tables(M + S, self.head_dim, tokens.device)
        x = self.drop(x)
        layer_stats, new_memory = [], []
        for i, block in enumerate(self.blocks):
            inputs = torch.cat([memory[i].to(x.dtype), x], dim=1) if memory else x  # [B, M + S, D]
            if self.memory_len:
                new_memory.append(inputs[:, -self.memory_len:].detach())
            x, out = block(inputs, tokens, positions)
            layer_stats.append(out)
        return LMOutput(self.head(self.ln_out(x)), layer_stats, memory=new_memory or None)
