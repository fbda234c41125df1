"""Product-key memory (Lample et al. 2019) and its ReLU variant (Csordás et al. 2023).

Per head, a query q [dk] is split in halves; each half scores its own table of n_keys sub-keys;
the top-knn of each half combine into knn² candidate slots (score = sum of the halves' scores),
of which the top-knn are read from a value table of n_keys² rows shared by the heads:

    y = Σ_heads Σ_{slot ∈ top-knn} w(score_slot) · value[slot],   w = softmax (original) or ReLU.

``query=projection`` learns one query per head (W_q x); ``query=input`` queries every head with the
layer's input x itself (dk = D), as the σ-MoE paper's PKM. The softmax normalises over each head's knn
slots (``normalize=head``) or over all H·knn slots read (``joint``). ``knn=0`` reads every slot: the score
of slot (i, j) is Σ_heads (q₁·k₁ᵢ + q₂·k₂ⱼ), the activation runs over all n_keys² slots and y = w · values,
which is what the σ-MoE authors' PKM runs compute (their knn 128 ≥ n_keys takes that dense path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sffn_lab.kernels.precision import autocast_operands
from sffn_lab.kernels.routing_plan import counts_per_id
from sffn_lab.layers.ffn_output import FFNOutput
from sffn_lab.layers.routers import at_least_fp32


class ProductKeyMemory(nn.Module):
    """x [B, S, D] → ``FFNOutput`` (y [B, S, D], counts [n_keys²] of the slots read)."""

    def __init__(self, d_model: int, opts, dropout: float = 0.0):
        """``opts``: ``model.ffn.pkm`` (``sffn_lab.variants.pkm.PKMOptions``)."""
        super().__init__()
        self.opts = opts
        H, n, dk = opts.heads, opts.n_keys, opts.query_size(d_model)
        if dk % 2:
            raise ValueError(f"a query of {dk} splits in two halves: it must be even (query=input: d_model {d_model})")
        self.query = nn.Linear(d_model, H * dk, bias=False) if opts.query == "projection" else None
        self.sub_keys = nn.Parameter(torch.randn(H, 2, n, dk // 2) * (dk // 2) ** -0.5)
        self.values = nn.Parameter(torch.empty(n * n, d_model))
        # Softmax weights sum to 1 per head; ReLU weights do not, so their values start smaller
        # (read H·knn slots, or all n² when knn = 0, with O(1) weights each: std slots^-1/2 keeps unit scale).
        slots_read = H * opts.knn if opts.knn else n * n
        value_std = d_model**-0.5 if opts.activation == "softmax" else slots_read**-0.5
        nn.init.normal_(self.values, std=value_std)
        self.dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def paper_init_(self, scale: float) -> None:
        """The σ-MoE paper's PKM init with s = ``scale``: sub-keys N(0, s²/dk), values N(0, s²/D) (or
        N(0, s²/n_keys²) for ``value_fan_in=slots``, its "init" variant)."""
        nn.init.normal_(self.sub_keys, std=scale / math.sqrt(2 * self.sub_keys.shape[-1]))
        fan_in = self.values.shape[1] if self.opts.value_fan_in == "d_model" else self.values.shape[0]
        nn.init.normal_(self.values, std=scale / math.sqrt(fan_in))

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] → (scores [T, H, knn] in fp32 or wider, slots [T, H, knn]) of the best cartesian products
        per head."""
        n, knn = self.opts.n_keys, self.opts.knn
        top_scores, top_keys = self.half_scores(x).topk(knn, dim=-1)  # [T, H, 2, knn]
        pair_scores = top_scores[:, :, 0, :, None] + top_scores[:, :, 1, None, :]  # [T, H, knn, knn]
        scores, flat = pair_scores.flatten(2).topk(knn, dim=-1)
        first = top_keys[:, :, 0].gather(-1, flat // knn)
        second = top_keys[:, :, 1].gather(-1, flat % knn)
        return scores, first * n + second

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """Read weights [T, H, k] of slot scores [T, H, k] (knn = 0: H = 1, k = n_keys²)."""
        if self.opts.activation == "relu":
            return F.relu(scores)
        if self.opts.normalize == "joint":
            return torch.softmax(scores.flatten(1), dim=-1).view_as(scores)
        return torch.softmax(scores, dim=-1)

    def half_scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] → each head's scores of its two sub-key tables [T, H, 2, n_keys], fp32 or wider."""
        H, dk = self.opts.heads, 2 * self.sub_keys.shape[-1]
        q = (self.query(x) if self.query is not None else x[:, None, :].expand(-1, H, -1)).reshape(-1, H, 2, dk // 2)
        with torch.autocast(x.device.type, enabled=False):  # scores and weights in fp32, like routing logits
            return torch.einsum("thcd,hcnd->thcn", at_least_fp32(q), at_least_fp32(self.sub_keys))

    def read_every_slot(self, x: torch.Tensor) -> FFNOutput:
        """knn = 0: x [B, S, D] → every slot's score summed over heads [T, n_keys²], activated, times values."""
        B, S, D = x.shape
        half = self.half_scores(x.reshape(B * S, D))
        scores = (half[:, :, 0, :, None] + half[:, :, 1, None, :]).sum(1).flatten(1)  # [T, n²]
        weights = self.weights(scores[:, None, :])[:, 0]
        read, table = autocast_operands(self.dropout(weights), self.values)
        with torch.autocast(x.device.type, enabled=False):
            y = read @ table
        counts = (weights > 0).sum(0).float()
        return FFNOutput(y=y.view(B, S, D), expert_counts=counts, gate_mean=weights.detach().mean())

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> FFNOutput:
        if self.opts.knn == 0:
            return self.read_every_slot(x)
        B, S, D = x.shape
        scores, slots = self.select(x.reshape(B * S, D))
        weights = self.weights(scores)
        # the value lookup is a sparse matmul: under autocast it runs in the autocast dtype, as one would
        read, table = autocast_operands(self.dropout(weights).flatten(1), self.values)
        y = F.embedding_bag(slots.flatten(1), table, per_sample_weights=read.to(table.dtype), mode="sum")
        counts = counts_per_id(slots, self.values.shape[0]).float()
        return FFNOutput(y=y.view(B, S, D), expert_counts=counts, gate_mean=weights.detach().mean())
