"""sMLP (Yu et al. 2022): an attention-free language model of gMLP blocks and sparse all-MLP blocks.

    embeddings → N1 × gMLP block → N2 × sparse block → LN → output projection (tied: model.tie_embeddings)

gMLP block (dense): x + W_out( u ⊙ SGU(v) ),  [u, v] = GELU(W_in LN(x)), SGU(v) = W_s LN(v) + b with
W_s [L, L] lower-triangular, so position t mixes positions ≤ t only. ``model.smlp.mixing`` picks how W_s
is parameterised: ``full`` (one weight per position pair: gMLP's spatial gating unit, Liu et al. 2021 §2.1,
W ∈ R^{n×n}; the sMLP paper builds on gMLP) or ``toeplitz`` (the
default: W_s[t, s] = w[t − s], one weight per offset). Training windows start at random offsets of the
corpus, so a full W_s must learn the same relative pattern separately at every position; on the
synthetic corpus (d_model 64, 300 steps of 32 × 64 tokens) Toeplitz mixing reaches 3.9 bits where
full mixing is still at 4.8 (unigram: 5.0).
Sparse block: the SGU is replaced by an **sMoE**: v's F channels are split into N chunks, and each
chunk is mixed along the token axis by one of N experts (each its own causal W_s^i, b^i); then a
**tMoE** (any FFN of ``model.ffn``, BASE routing in the paper's setup) follows as a pre-LN residual.

sMoE routing:
- ``deterministic``: chunk i → expert i, no gate.
- ``partial_prediction``: a router W_r [N, P] reads each hidden channel's values at the first
  P = ⌊fraction · max_seq_len⌋ positions (20%: the design card's reading of the paper) and sends that
  channel to its top-1 expert, output scaled by the softmax gate. Positions before P keep the
  deterministic chunk i → expert i (their outputs never depend on later tokens), and the LM loss is
  computed only on positions ≥ P (``LMOutput.loss_mask``). Assumed, with no source at hand: the router
  per hidden channel, the softmax top-1 gate, the deterministic prefix and the absence of any balancing
  (docs/results.md: 10% of the experts end unused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sffn_lab.config import ModelConfig
from sffn_lab.kernels import RoutingPlan, expert_up
from sffn_lab.kernels.routing_plan import counts_per_id
from sffn_lab.layers.factory import build_ffn
from sffn_lab.layers.ffn_output import RoutingStats
from sffn_lab.models.output import LMOutput


def mixing_matrices(weight: torch.Tensor, seq_len: int, mixing: str) -> torch.Tensor:
    """Causal token-mixing matrices M [n, S, S] (M[t, s] = 0 for s > t) for S = ``seq_len`` positions.

    ``full``: weight [n, L, L] holds M itself (gMLP, sMLP), one weight per position pair.
    ``toeplitz``: weight [n, L] is a kernel over the offset, M[t, s] = weight[t − s]: shift-invariant, so
    a pattern learned at one position of a (randomly placed) training window holds at all of them.
    """
    if mixing == "full":
        return torch.tril(weight[:, :seq_len, :seq_len])
    pos = torch.arange(seq_len, device=weight.device)
    offsets = pos[:, None] - pos[None, :]
    return torch.tril(weight[:, offsets.clamp(min=0)])


def init_mixing(n: int, max_seq_len: int, mixing: str) -> tuple[nn.Parameter, nn.Parameter]:
    """(weight, bias [n, L]) of n mixing matrices: weights near 0 and biases 1, so every gate starts
    close to the identity (gMLP's initialisation)."""
    shape = (n, max_seq_len, max_seq_len) if mixing == "full" else (n, max_seq_len)
    eps = 1e-3 / max_seq_len
    return nn.Parameter(torch.empty(shape).uniform_(-eps, eps)), nn.Parameter(torch.ones(n, max_seq_len))


class SparseTokenMixing(nn.Module):
    """v [B, S, F] → [B, S, F]: every hidden channel is mixed causally along the token axis by one of N experts.

    With N = 1 this is the gMLP's dense spatial gating unit; with N > 1 it is the sMoE. Deterministic
    routing sends the contiguous chunk i of F/N channels to expert i. Partial prediction routes every
    channel c of every sequence on its own: a router W_r [N, P] reads the channel's values at the first
    P = ⌊fraction · max_seq_len⌋ positions, the channel goes to its top-1 expert, and the mixed channel is
    scaled by that expert's softmax probability (so the router learns). Positions before P keep the
    deterministic experts (they cannot depend on the routing, which reads them). The routed tail is one
    grouped matmul over the B·F channel rows (``sffn_lab.kernels.expert_up``), so each channel is mixed
    once, by its own expert.
    """

    def __init__(self, hidden: int, n_chunks: int, max_seq_len: int, routing: str, fraction: float,
                 mixing: str = "toeplitz"):
        super().__init__()
        self.n_chunks, self.mixing = n_chunks, mixing
        self.weight, self.bias = init_mixing(n_chunks, max_seq_len, mixing)
        self.prefix = int(fraction * max_seq_len) if routing == "partial_prediction" else 0
        self.router = nn.Linear(self.prefix, n_chunks, bias=False) if routing == "partial_prediction" else None

    def prefix_length(self, seq_len: int) -> int:
        """P: the positions the router reads (and the loss skips) under partial prediction; 0 otherwise."""
        return min(self.prefix, seq_len)

    def route(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v [B, S ≥ P, F] → (expert [B, F], gate [B, F]) of every channel, from its first P values only."""
        probs = torch.softmax(self.router(v[:, : self.prefix].transpose(1, 2)), dim=-1)  # [B, F, N]
        gate, expert = probs.max(dim=-1)
        return expert, gate

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, RoutingStats | None]:
        B, S, Fh = v.shape
        w = mixing_matrices(self.weight, S, self.mixing)  # [N, S, S]
        bias = self.bias[:, :S]  # [N, S]
        P = self.prefix_length(S) if self.router is not None else S
        chunks = v.view(B, S, self.n_chunks, Fh // self.n_chunks)
        # positions < P: chunk i → expert i (causal, so they read positions < P only)
        head = torch.einsum("nts,bsnc->btnc", w[:, :P, :P], chunks[:, :P]) + bias[:, :P].t()[None, :, :, None]
        head = head.reshape(B, P, Fh)
        if P == S:
            return head, None
        expert, gate = self.route(v)
        rows = v.transpose(1, 2).reshape(B * Fh, S)  # one row per (sequence, channel)
        plan = RoutingPlan.of(expert.reshape(-1, 1), self.n_chunks)
        tail = expert_up(rows, w[:, P:].transpose(1, 2), plan).view(B, Fh, S - P)  # Σ_s W_e[t, s] v[s, c]
        tail = (tail + bias[:, P:][expert]) * gate[..., None]
        out = torch.cat([head, tail.transpose(1, 2)], dim=1)
        counts = counts_per_id(expert, self.n_chunks).float()
        return out, RoutingStats(expert_counts=counts, gate_mean=gate.detach().mean())


class SMLPBlock(nn.Module):
    """x [B, S, D] → (x [B, S, D], routing stats): x + W_out(u ⊙ mix(LN(v))), [u, v] = GELU(W_in LN(x)).

    A gMLP block mixes with one dense matrix; a sparse block mixes with the sMoE and then adds the tMoE,
    x + FFN(LN(x)).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int, n_layers: int, sparse: bool):
        super().__init__()
        s, D = cfg.smlp, cfg.d_model
        self.ln = nn.LayerNorm(D)
        self.proj_in = nn.Linear(D, 2 * s.d_hidden)
        self.ln_v = nn.LayerNorm(s.d_hidden)
        self.mixing = SparseTokenMixing(s.d_hidden, s.n_chunks if sparse else 1, max_seq_len,
                                        s.routing if sparse else "deterministic", s.prediction_fraction, s.mixing)
        self.proj_out = nn.Linear(s.d_hidden, D)
        self.ln_ffn = nn.LayerNorm(D) if sparse else None
        self.ffn = build_ffn(cfg.ffn, D, n_layers, vocab_size) if sparse else None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, list[RoutingStats]]:
        u, v = F.gelu(self.proj_in(self.ln(x))).chunk(2, dim=-1)
        mixed, routing = self.mixing(self.ln_v(v))
        x = x + self.proj_out(u * mixed)
        stats = [routing] if routing is not None else []
        if self.ffn is None:
            return x, stats
        out = self.ffn(self.ln_ffn(x), token_ids)
        return x + out.y, [out, *stats]


class SparseAllMLP(nn.Module):
    """tokens [B, S] (S ≤ max_seq_len) → ``LMOutput`` (logits [B, S, V], routing stats, loss mask)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int):
        super().__init__()
        s = cfg.smlp
        self.max_seq_len = max_seq_len
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        n_layers = s.n_dense_blocks + s.n_sparse_blocks
        self.blocks = nn.ModuleList(
            SMLPBlock(cfg, vocab_size, max_seq_len, n_layers, sparse=i >= s.n_dense_blocks) for i in range(n_layers)
        )
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> LMOutput:
        S = tokens.shape[1]
        if S > self.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds the model's maximum {self.max_seq_len}")
        x = self.embed(tokens)
        outputs: list[RoutingStats] = []
        for block in self.blocks:
            x, stats = block(x, tokens)
            outputs += stats
        P = self.blocks[-1].mixing.prefix_length(S)  # the last block is sparse when any is
        mask = torch.arange(S, device=tokens.device) >= P if P else None
        return LMOutput(self.head(self.ln_out(x)), outputs, mask)
