"""Routers: which K of the N_E expert blocks each token uses, with which gate, at which auxiliary cost.

Every router maps x [T, D] (plus token ids [B, S] or [T] and the expert bank, for routers that need them)
to a ``Routing``. The built-in routers are registered as variants by their declarations under
``sffn_lab/variants/`` (options, checks, accounting, without importing torch); a plugin's router is
registered itself (``Router`` carries the expert-bank variant's defaults). Batch statistics in auxiliary
losses (σ-MoE's entropy, Switch's balance) are taken over the global batch: ``global_mean`` averages them
across DDP ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sffn_lab.config import FFNConfig
from sffn_lab.layers.balanced_assignment import balanced_assignment
from sffn_lab.layers.expert_bank import ExpertBank
from sffn_lab.variants.bank import RouterVariant


@dataclass
class Routing:
    """indices [T, K] (long), gates [T, K] (fp32 or wider) or None (all ones), aux_loss scalar or None
    (already weighted)."""

    indices: torch.Tensor
    gates: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Average of a per-rank mean over all DDP ranks (gradients flow to the local part); identity otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x) / dist.get_world_size()
    return x


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Routing statistics in fp32 (or fp64) even when the model runs in half precision."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def fp32_scores(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [T, D] · rows [N, D]ᵀ → [T, N], computed in at least fp32 with autocast off (routing decisions
    and gates do not take bf16 rounding)."""
    with torch.autocast(x.device.type, enabled=False):
        return at_least_fp32(x) @ at_least_fp32(rows).t()


def neg_entropy_of_mean_softmax(logits: torch.Tensor) -> torch.Tensor:
    """−H(mean_t softmax(logits[t])) over the global batch; logits [T, E] → scalar. Minimising it spreads load."""
    log_mean = torch.logsumexp(F.log_softmax(at_least_fp32(logits), dim=-1), dim=0) - math.log(logits.shape[0])
    mean = global_mean(log_mean.exp())
    return (mean * mean.clamp_min(1e-30).log()).sum()


def renorm_rows_keep_std(weight: torch.Tensor) -> None:
    """Give every row the same norm while keeping the tensor's overall std (σ-MoE selector init)."""
    with torch.no_grad():
        std = weight.std()
        weight.div_(weight.norm(dim=1, keepdim=True))
        weight.mul_(std / weight.std())


class Router(nn.Module, RouterVariant):
    """Base of every router: ``forward(x [T, D], token_ids [B, S] | None, bank) -> Routing``; the variant's
    own initialisation of the expert bank it routes to (``init_bank``: by default the bank's own), and the
    σ-MoE paper's scaled init of the router and its bank (``paper_init_``, which ``model.init=paper`` uses).

    Built from the whole ``model.ffn`` section; ``self.opts`` is the variant's own section (its ``Options``).
    A ``Router`` subclass is itself a variant when registered (``@register("name")``, as a plugin's is): the
    expert bank, its checks and its accounting come from ``RouterVariant``.
    """

    @classmethod
    def router_class(cls) -> type:
        return cls

    def __init__(self, cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int):
        super().__init__()
        self.k = cfg.top_k
        self.opts = cfg.options.get(cfg.kind)

    def init_bank(self, bank: ExpertBank) -> None:
        """Initialise ``bank`` as this variant's method prescribes (nothing to change by default)."""

    def paper_init_(self, bank: ExpertBank, scale: float) -> None:
        """The paper's init with scale s = √(2 / n_layers) on every std (here: the bank)."""
        bank.init_scaled_(scale)


class LinearRouter(Router):
    """Base of the routers that score experts with a learned selection matrix W_sel [N_E, D]."""

    def __init__(self, cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int):
        super().__init__(cfg, d_model, n_layers, vocab_size)
        self.selector = nn.Parameter(torch.empty(cfg.n_experts, d_model))
        nn.init.normal_(self.selector, std=d_model**-0.5)


    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Routing logits [T, N_E] in fp32 (fp64 for fp64 inputs) whatever the model's precision."""
        return fp32_scores(x, self.selector)

    @torch.no_grad()
    def paper_init_(self, bank: ExpertBank, scale: float) -> None:
        """The selector as N(0, scale² / D) with rows of equal norm (the σ-MoE selector init), then the bank."""
        self.init_selector_(scale, equal_norms=True)
        super().paper_init_(bank, scale)

    @torch.no_grad()
    def init_selector_(self, scale: float, equal_norms: bool) -> None:
        """W_sel ~ N(0, scale² / D), its rows then given equal norms (keeping the std) when ``equal_norms``."""
        nn.init.normal_(self.selector, std=scale / math.sqrt(self.selector.shape[1]))
        if equal_norms:
            renorm_rows_keep_std(self.selector)


def select_dropping_experts(scores: torch.Tensor, k: int, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-``k`` of scores [T, E] after dropping each (token, expert) pair with probability ``p`` (training):
    indices [T, k], and which of them were dropped [T, k] (bool), or None when nothing is dropped. A token
    with fewer than k survivors gets them all, then its best-scoring dropped experts."""
    if p == 0:
        return scores.topk(k, dim=-1, sorted=False).indices, None
    dropped = torch.rand_like(scores) < p
    with torch.no_grad():  # dropped scores sink below every survivor, keeping their order among themselves
        below = scores - dropped * (scores.max() - scores.min() + 1)
    indices = below.topk(k, dim=-1, sorted=False).indices
    return indices, dropped.gather(-1, indices)


def gate_values(logits: torch.Tensor, indices: torch.Tensor, kind: str) -> torch.Tensor | None:
    """Gates [T, K] of the selected experts: sigmoid of their logits, their softmax probability over all
    experts (``softmax``) or over the K selected logits (``softmax_topk``), or none."""
    if kind == "sigmoid":
        return torch.sigmoid(logits.gather(-1, indices))
    if kind == "softmax":
        return torch.softmax(logits, dim=-1).gather(-1, indices)
    if kind == "softmax_topk":
        return torch.softmax(logits.gather(-1, indices), dim=-1)
    return None


class SigmaMoERouter(LinearRouter):
    """σ-MoE: top-K of W_sel x, sigmoid gates (not renormalised), entropy regulariser, expert dropout.

    Expert dropout (δ, training only) removes each (token, expert) pair from the selection with probability
    δ; when fewer than K experts of a token survive, the top-K still picks dropped ones, and those get a
    gate of 0 (the paper's rule), so a dropped expert never contributes.

    Init (always the paper's scaled rule, s = √(2 / n_layers)): keys N(0, s²/D), selector N(0, s²/D) with
    rows of equal norm, values N(0, s²/(N_E·G)); ``init=standard`` (the paper's "standard init" ablation)
    gives the values fan-in G instead, each expert initialised as its own small FFN.
    """

    def __init__(self, cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int):
        super().__init__(cfg, d_model, n_layers, vocab_size)
        self.depth_scale = math.sqrt(2 / n_layers)  # the paper's √(2 / n_layers) on every init std

    def init_bank(self, bank: ExpertBank) -> None:
        self.paper_init_(bank, self.depth_scale)

    @torch.no_grad()
    def paper_init_(self, bank: ExpertBank, scale: float) -> None:
        self.init_selector_(scale, equal_norms=True)
        bank.init_scaled_(scale, per_expert=self.opts.init == "standard")

    def forward(self, x, token_ids=None, bank=None) -> Routing:
        logits = self.logits(x)
        indices, dropped = select_dropping_experts(logits, self.k, self.opts.expert_dropout if self.training else 0)
        gates = gate_values(logits, indices, self.opts.gate)
        if dropped is not None:
            gates = (~dropped).to(logits.dtype) if gates is None else gates * ~dropped
        if gates is not None and self.opts.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        aux = self.opts.entropy_coef * neg_entropy_of_mean_softmax(logits) if self.training else None
        return Routing(indices, gates, aux)


class SwitchRouter(LinearRouter):
    """Switch: softmax gate, top-K (1 in the paper), balance loss α·N·Σ f_i P_i, optional capacity.

    ``model.init=paper`` gives it the σ-MoE paper's Switch baseline init: every std of the scaled rule times
    √init_scale (0.1 there), values with per-expert fan-in G, and a selector without row renormalisation.
    """

    @torch.no_grad()
    def paper_init_(self, bank: ExpertBank, scale: float) -> None:
        scale = scale * math.sqrt(self.opts.init_scale)
        self.init_selector_(scale, equal_norms=False)
        bank.init_scaled_(scale, per_expert=True)

    def forward(self, x, token_ids=None, bank=None) -> Routing:
        logits = self.logits(x)
        probs = torch.softmax(at_least_fp32(logits), dim=-1)
        gates, indices = probs.topk(self.k, dim=-1)
        n_experts = logits.shape[-1]
        aux = None
        if self.training:
            dispatched = F.one_hot(indices, n_experts).float().sum(1).mean(0) / self.k  # f_i
            aux = self.opts.balance_coef * n_experts * (global_mean(dispatched) * global_mean(probs.mean(0))).sum()
        if self.opts.capacity_factor > 0:
            gates = gates * within_capacity(indices, n_experts, self.opts.capacity_factor)
        return Routing(indices, gates, aux)


def within_capacity(indices: torch.Tensor, n_experts: int, capacity_factor: float) -> torch.Tensor:
    """1.0 for the (token, k) assignments that fit an expert's capacity ⌈cf·T·K/N_E⌉ in token order, else 0."""
    T, K = indices.shape
    capacity = math.ceil(capacity_factor * T * K / n_experts)
    one_hot = F.one_hot(indices.t().reshape(-1), n_experts)  # k-major: first choices fill first
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
    return (position < capacity).float().view(K, T).t()


class SBaseRouter(LinearRouter):
    """S-BASE: Sinkhorn-balanced top-K in training, top-K of the logits at eval, sigmoid gates of the logits;
    optionally σ-MoE's entropy regulariser and expert dropout (the σ-MoE paper's S-BASE uses both). A
    dropped expert leaves the balanced selection; as in the authors' code it keeps its gate when it must
    still be picked (fewer than K left): github RobertCsordas/moe, layers/moe_layer.py lines 657-677 at
    6b175aa ("sinkmoid": dropped scores set to −inf, the gates re-read from the raw scores after top-K)."""

    def forward(self, x, token_ids=None, bank=None) -> Routing:
        logits = self.logits(x)
        if self.training:
            with torch.no_grad():
                balanced = sinkhorn(at_least_fp32(logits), self.opts.sinkhorn_iters)
            indices, _ = select_dropping_experts(balanced, self.k, self.opts.expert_dropout)
        else:
            indices = logits.topk(self.k, dim=-1).indices
        aux = None
        if self.training and self.opts.entropy_coef > 0:
            aux = self.opts.entropy_coef * neg_entropy_of_mean_softmax(logits)
        return Routing(indices, torch.sigmoid(logits.gather(-1, indices)), aux)


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Log-domain Sinkhorn on [T, E]: rows sum to 1 and columns to T/E after the last step."""
    T, E = logits.shape
    log_p = logits
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + math.log(T / E)
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p


class BaseRouter(LinearRouter):
    """BASE layers: the optimal balanced assignment in training (the auction of
    ``sffn_lab.layers.balanced_assignment``: every expert gets T·K/N_E tokens), greedy top-K at eval; gates
    σ(x·c_e) of the selector rows c_e (fairseq's expert centroids: orthogonal, gain 0.1, in the fairseq form).
    Each training step's auction starts from the previous step's expert prices (``auction_prices`` [N_E], a
    buffer saved with the model so that a resumed run continues exactly; NaN: no step yet, a cold start)."""

    def __init__(self, cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int):
        super().__init__(cfg, d_model, n_layers, vocab_size)
        if self.opts.form == "fairseq":
            nn.init.orthogonal_(self.selector, gain=0.1)
        self.register_buffer("auction_prices", torch.full((cfg.n_experts,), float("nan")))
        self.register_load_state_dict_pre_hook(cold_start_without_prices)

    def forward(self, x, token_ids=None, bank=None) -> Routing:
        logits = self.logits(x)
        if self.training:
            with torch.no_grad():
                start = None if bool(self.auction_prices.isnan().any()) else self.auction_prices
                indices, prices = balanced_assignment(at_least_fp32(logits), self.k, start)
                self.auction_prices.copy_(prices)
        else:
            indices = logits.topk(self.k, dim=-1).indices
        return Routing(indices, torch.sigmoid(logits.gather(-1, indices)))


def cold_start_without_prices(router: BaseRouter, state_dict: dict, prefix: str, *args) -> None:
    """Load a BASE router saved before its auction kept prices: it starts its next auction cold."""
    state_dict.setdefault(prefix + "auction_prices", torch.full_like(router.auction_prices, float("nan")))


class HashRouter(Router):
    """HashLayer (Roller et al. 2021, random hash): a fixed random list of K distinct experts drawn for every
    token id of the vocabulary (a table [vocab_size, K]: no folding of ids into fewer buckets); no gate, no
    loss."""

    def __init__(self, cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int):
        super().__init__(cfg, d_model, n_layers, vocab_size)
        generator = torch.Generator().manual_seed(self.opts.seed)
        table = torch.rand(vocab_size, cfg.n_experts, generator=generator).argsort(dim=1)[:, :self.k]
        self.register_buffer("table", table)

    def forward(self, x, token_ids=None, bank=None) -> Routing:
        if token_ids is None:
            raise ValueError("the hash router routes by token id: call the layer with token_ids [B, S]")
        return Routing(self.table[token_ids.reshape(-1)])


class AvgKRouter(Router):
    """Avg-K: block score = x · mean of the block's key vectors; top-K blocks; no balancing loss."""

    def forward(self, x, token_ids=None, bank: ExpertBank | None = None) -> Routing:
        scores = fp32_scores(x, bank.block_means())
        indices = scores.topk(self.k, dim=-1).indices
        return Routing(indices, gate_values(scores, indices, self.opts.gate))
