"""sMLP (Yu et al. 2022): an attention-free language model of gMLP blocks and sparse all-MLP blocks.

    embeddings → N1 × gMLP block → N2 × sparse block → LN → tied output projection

gMLP block (dense): x + W_out( u ⊙ SGU(v) ),  [u, v] = GELU(W_in LN(x)), SGU(v) = W_s LN(v) + b with
W_s [L, L] lower-triangular, so position t mixes positions ≤ t only. ``model.smlp.mixing`` picks how W_s
is parameterised: ``full`` (one weight per position pair, as in the papers) or ``toeplitz`` (the
default: W_s[t, s] = w[t − s], one weight per offset). Training windows start at random offsets of the
corpus, so a full W_s must learn the same relative pattern separately at every position; on the
synthetic corpus (d_model 64, 300 steps of 32 × 64 tokens) Toeplitz mixing reaches 3.9 bits where
full mixing is still at 4.8 (unigram: 5.0).
Sparse block: the SGU is replaced by an **sMoE**: v's F channels are split into N chunks, and each
chunk is mixed along the token axis by one of N experts (each its own causal W_s^i, b^i); then a
**tMoE** (any FFN of ``model.ffn``, BASE routing in the paper's setup) follows as a pre-LN residual.

sMoE routing:
- ``deterministic``: chunk i → expert i, no gate.
- ``partial_prediction``: a router W_r reads each chunk's mean over the first P = ⌊fraction·S⌋
  positions and sends the chunk to its top-1 expert, output scaled by the softmax gate. Positions
  before P keep the deterministic chunk i → expert i (their outputs never depend on later tokens),
  and the LM loss is computed only on positions ≥ P (``LMOutput.loss_mask``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sffn_lab.config import ModelConfig
from sffn_lab.layers.factory import build_ffn
from sffn_lab.layers.ffn_output import FFNOutput
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
    """v [B, S, F] split into N chunks of F/N channels, each mixed causally by an expert → [B, S, F].

    With N = 1 (and deterministic routing) this is the gMLP's dense spatial gating unit; with N > 1 it
    is the sMoE.
    """

    def __init__(self, hidden: int, n_chunks: int, max_seq_len: int, routing: str, fraction: float,
                 mixing: str = "toeplitz"):
        super().__init__()
        self.n_chunks, self.fraction, self.mixing = n_chunks, fraction, mixing
        self.weight, self.bias = init_mixing(n_chunks, max_seq_len, mixing)
        chunk = hidden // n_chunks
        self.router = nn.Linear(chunk, n_chunks, bias=False) if routing == "partial_prediction" else None

    def prefix_length(self, seq_len: int) -> int:
        """P: the positions the router reads (and the loss skips) under partial prediction."""
        return int(self.fraction * seq_len) if self.router is not None else 0

    def route(self, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """chunks [B, S, N, C] → (expert [B, N], gate [B, N]) from the first P positions only."""
        P = max(1, self.prefix_length(chunks.shape[1]))
        probs = torch.softmax(self.router(chunks[:, :P].mean(dim=1)), dim=-1)  # [B, N, N]
        gate, expert = probs.max(dim=-1)
        return expert, gate

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, FFNOutput | None]:
        B, S, Fh = v.shape
        chunks = v.view(B, S, self.n_chunks, Fh // self.n_chunks)
        w = mixing_matrices(self.weight, S, self.mixing)  # [N, S, S]
        bias = self.bias[:, :S]  # [N, S]
        P = self.prefix_length(S) if self.router is not None else S
        # positions < P: chunk i → expert i (causal, so they read positions < P only)
        head = torch.einsum("nts,bsnc->btnc", w[:, :P, :P], chunks[:, :P]) + bias[:, :P].t()[None, :, :, None]
        if self.router is None:
            return head.reshape(B, S, Fh), None
        expert, gate = self.route(chunks)
        w_tail = w[:, P:][expert]  # [B, N, S - P, S]: each chunk's chosen expert, rows of positions ≥ P
        tail = torch.einsum("bnts,bsnc->btnc", w_tail, chunks) + bias[:, P:][expert].transpose(1, 2)[..., None]
        out = torch.cat([head, tail * gate[:, None, :, None]], dim=1)
        counts = torch.bincount(expert.reshape(-1), minlength=self.n_chunks).float()
        return out.reshape(B, S, Fh), FFNOutput(out, expert_counts=counts, gate_mean=gate.detach().mean())


class SMLPBlock(nn.Module):
    """x [B, S, D] → (x [B, S, D], routing records): x + W_out(u ⊙ mix(LN(v))), [u, v] = GELU(W_in LN(x)).

    A gMLP block mixes with one dense matrix; a sparse block mixes with the sMoE and then adds the tMoE,
    x + FFN(LN(x)).
    """

    def __init__(self, cfg: ModelConfig, max_seq_len: int, n_layers: int, sparse: bool):
        super().__init__()
        s, D = cfg.smlp, cfg.d_model
        self.ln = nn.LayerNorm(D)
        self.proj_in = nn.Linear(D, 2 * s.d_hidden)
        self.ln_v = nn.LayerNorm(s.d_hidden)
        self.mixing = SparseTokenMixing(s.d_hidden, s.n_chunks if sparse else 1, max_seq_len,
                                        s.routing if sparse else "deterministic", s.prediction_fraction, s.mixing)
        self.proj_out = nn.Linear(s.d_hidden, D)
        self.ln_ffn = nn.LayerNorm(D) if sparse else None
        self.ffn = build_ffn(cfg.ffn, D, n_layers) if sparse else None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, list[FFNOutput]]:
        u, v = F.gelu(self.proj_in(self.ln(x))).chunk(2, dim=-1)
        mixed, routing = self.mixing(self.ln_v(v))
        x = x + self.proj_out(u * mixed)
        records = [routing] if routing is not None else []
        if self.ffn is None:
            return x, records
        out = self.ffn(self.ln_ffn(x), token_ids)
        return x + out.y, [out, *records]


class SparseAllMLP(nn.Module):
    """tokens [B, S] (S ≤ max_seq_len) → ``LMOutput`` (logits [B, S, V], FFN records, loss mask)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int):
        super().__init__()
        s = cfg.smlp
        self.max_seq_len = max_seq_len
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        n_layers = s.n_dense_blocks + s.n_sparse_blocks
        self.blocks = nn.ModuleList(
            SMLPBlock(cfg, max_seq_len, n_layers, sparse=i >= s.n_dense_blocks) for i in range(n_layers)
        )
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> LMOutput:
        S = tokens.shape[1]
        if S > self.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds the model's maximum {self.max_seq_len}")
        x = self.embed(tokens)
        outputs: list[FFNOutput] = []
        for block in self.blocks:
            x, records = block(x, tokens)
            outputs += records
        P = self.blocks[-1].mixing.prefix_length(S)  # the last block is sparse when any is
        mask = torch.arange(S, device=tokens.device) >= P if P else None
        return LMOutput(self.head(self.ln_out(x)), outputs, mask)
