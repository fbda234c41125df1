"""BASE layers' balanced assignment: the auction algorithm (Bertsekas) with ε-scaling, vectorised in torch.

Problem: scores s [T, E]; give every token t a set S_t of K distinct experts, every expert taking at most
C = ⌈T·K/E⌉ tokens, so as to maximise Σ_t Σ_{e ∈ S_t} s[t, e]. When E divides T·K every expert takes
exactly C = T·K/E. Otherwise E·C − T·K (< E) dummy tokens, each wanting one expert at a score equal for
all experts (the lowest score), fill the spare slots: the problem becomes exact again, and the spare
slots land wherever leaving them empty costs the least (the optimum with at most C tokens per expert).

Relation to fairseq (``fairseq/clib/libbase/balanced_assignment.cpp``, BASE layers, Lewis et al. 2021):
the same forward auction, with these differences. fairseq lets the E experts bid for the T tokens (K = 1,
E dividing T), with one fixed ε = (max s − min s) / 50 and a host read every round. Here the tokens bid
for experts, which lets a token ask for K distinct experts: the K-assignment generalisation (a token is a
bidder that wants K objects, each bid judged against its (K+1)-th best value, as fairseq's experts judge
their C best tokens against the (C+1)-th), not a second-choice round. ε shrinks in phases (ε-scaling,
Bertsekas & Eckstein 1988) down to ``eps_final`` · (max s − min s).

State: an expert's C slots, each with a price and an owner (or nobody), kept in descending price order.
The price of an expert, p_e, is its cheapest slot's.
One round (a Jacobi auction): every token still short of experts bids. Token t, short by d, takes the values
v_e = s[t, e] − p_e of the experts it does not hold, w = its (d+1)-th best value, and bids s[t, e] − w + ε
(≥ p_e + ε) for each of its d best. The bids, one list, are grouped by expert with one sort (by expert, then
bid, then token), and every expert keeps the C highest of its slots and its bids (a merge of two sorted
lists); a token whose slot is taken bids again in the next round. Ties go to the lower index (equal values:
the lower expert; equal new bids: the lower token; a held slot stays ahead of an equal new bid), so the
result is deterministic. A new phase keeps prices and the pairs that still satisfy ε-complementary
slackness (s[t, e] − paid ≥ best alternative value − ε) and frees the others, at their expert's price.

Guarantee: at the end of the last phase every held pair satisfies ε-complementary slackness, also at its
expert's price (s[t, e] − p_e ≥ s[t, e] − paid ≥ the best alternative value − ε), and the prices p_e
with each token's (wanted + 1)-th best value form a dual solution, so the total score is within E·C·ε of the
optimum (T·K·ε when E divides T·K; each dummy token adds one ε).

Warm start: ``start_prices`` [E] (the prices an earlier call returned, in units of its score range and
centred; a router passes the previous training step's) sets every slot's starting price and skips the first,
coarsest phase. Any starting prices keep the guarantee (every slot is filled at the end, every held pair
satisfies ε-complementary slackness); prices near the equilibrium make the phases short. On the trained
routers of the Avg-K compute-equal sweep, from the prices of the previous batch, a call took 2.9–5.1× less
time on the CPU at the same total score (docs/results.md, "The warm start").

Bounded work: ``n_phases`` phases of at most ``max_rounds`` rounds (a tail's bids count as rounds of
``TAIL_BIDS`` bids). Device-side until the tail; the only other host read is the
unmet demand (Σ over tokens of how many experts each still lacks), at rounds 0, 1, 2, 4, 8 of a phase and
then every ``check_every`` rounds (on CUDA a data-dependent ``while`` would synchronise every round): the
phase ends when it is 0, and until the next read a round works on padded lists of the next power of two
above it (bidders compacted with ``nonzero_static``; no round increases the unmet demand), so every shape
comes from a fixed set and a round's work shrinks with the demand. Once the unmet demand is at most
``TAIL_BIDS``, the phase ends on the host, one bid at a time (``sequential_bids``: the same bids, made in
turn, a Gauss-Seidel auction): its late rounds have a few bidders each, a displaced token displacing the
next, and one host step per bid costs far less than one round of device operations (the trained routers of
an sMLP sweep spent about 70% of their rounds with at most 4 bidders). A phase still incomplete after
``max_rounds`` rounds hands on its prices; if it is the last, the assignment of the last phase that did
finish is returned (within E·C times that phase's ε of the optimum). Only if no phase finished are the
tokens still short completed by a round-robin fill of the free slots: exact capacities and distinct experts,
but score-blind.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np
import torch

EPS_START = 0.25  # ε of the first phase, as a fraction of the score range (max s − min s)
EPS_FINAL = 1e-3  # ε of the last phase, as a fraction of the score range
N_PHASES = 3  # ε falls by (EPS_START / EPS_FINAL)^(1 / (N_PHASES − 1)) from one phase to the next
MAX_ROUNDS = 2048  # bidding rounds per phase at most
CHECK_EVERY = 8  # rounds between two host reads of the unmet demand, once a phase has run 8 rounds
TAIL_BIDS = 256  # an unmet demand at most this large finishes the phase one bid at a time on the host


class Assignment(NamedTuple):
    """experts [T, k] (long, increasing along each row); prices [E]: the experts' final prices in units of the
    score range, centred (the ``start_prices`` of a later call)."""

    experts: torch.Tensor
    prices: torch.Tensor


def balanced_assignment(scores: torch.Tensor, k: int, start_prices: torch.Tensor | None = None,
                        eps_final: float = EPS_FINAL, n_phases: int = N_PHASES, max_rounds: int = MAX_ROUNDS,
                        check_every: int = CHECK_EVERY) -> Assignment:
    """scores [T, E] → k distinct experts per token, at most C = ⌈T·k/E⌉ tokens per expert (exactly T·k/E when
    E divides T·k), total score within E·C·ε of the optimum, ε = ``eps_final`` · (max − min of the scores);
    ``start_prices`` [E]: a warm start (an earlier call's prices). Non-finite scores count as the lowest
    finite one."""
    T, E = scores.shape
    if not 1 <= k <= E:
        raise ValueError(f"k ({k}) must be between 1 and the number of experts ({E})")
    if k == E:
        return Assignment(torch.arange(E, device=scores.device).expand(T, E).clone(), scores.new_zeros(E))
    s = scores.detach()
    finite = s.isfinite()
    lowest = s.masked_fill(~finite, float("inf")).amin()
    s = torch.where(finite, s, lowest)
    capacity = -(-T * k // E)
    spare = E * capacity - T * k  # dummy tokens, one slot each, at the same score for every expert
    s = torch.cat([s, lowest.expand(spare, E)])
    want = torch.full((T + spare,), k, device=s.device)
    want[T:] = 1
    spread = (s.amax() - lowest).clamp_min(torch.finfo(s.dtype).tiny)
    ratio = (EPS_START / eps_final) ** (1 / max(n_phases - 1, 1))
    slots = Slots.empty(capacity, len(s), s.new_zeros(E) if start_prices is None else start_prices.to(s) * spread)
    complete = None  # the assignment of the last phase that served every token
    host = None  # (s, want) on the host, for the phases' tails
    for phase in range(0 if start_prices is None or n_phases == 1 else 1, n_phases):
        eps = spread * eps_final * ratio ** (n_phases - 1 - phase)
        slots = slots.free_violations(s, eps)
        rounds = 0
        while (unmet := int((want - slots.counts()).sum())) and rounds < max_rounds:
            if unmet <= TAIL_BIDS:
                host = host or (s.cpu().numpy(), want.cpu().numpy())
                slots, bids = sequential_bids(*host, slots, float(eps), budget=(max_rounds - rounds) * TAIL_BIDS)
                rounds += -(-bids // TAIL_BIDS)
                continue
            size = 1 << (unmet - 1).bit_length()  # ≥ the unmet demand, which no round increases
            between = min(max(rounds, 1), check_every, max_rounds - rounds)  # reads at rounds 0, 1, 2, 4, 8, 16, …
            for _ in range(between):
                slots = bidding_round(s, want, k, slots, eps, size)
            rounds += between
        if not unmet:
            complete = slots
    final = complete if complete is not None else slots
    holds = final.holds()[:T]
    short = holds.sum(1) < k
    if bool(short.any()):
        holds = fill_round_robin(holds, short, k, capacity)
    prices = final.expert_prices()
    experts = torch.argsort((~holds).to(torch.uint8), dim=1, stable=True)[:, :k].contiguous()
    return Assignment(experts, (prices - prices.mean()) / spread)


class Slots:
    """Every expert's C slots, most expensive first: price [E, C] (sorted descending along each row) and owner
    [E, C] (a token index, or N = nobody). A slot's price is the bid that won it, or for a free slot the price
    its expert had when it was freed (at the start: the starting price, 0 cold)."""

    def __init__(self, price: torch.Tensor, owner: torch.Tensor, n_tokens: int):
        self.price, self.owner, self.n_tokens = price, owner, n_tokens

    @classmethod
    def empty(cls, capacity: int, n_tokens: int, prices: torch.Tensor) -> Slots:
        """Every slot free, at its expert's price (prices [E])."""
        price = prices[:, None].expand(len(prices), capacity).clone()
        return cls(price, torch.full(price.shape, n_tokens, dtype=torch.long, device=prices.device), n_tokens)

    def expert_prices(self) -> torch.Tensor:
        """[E]: the price of one more slot of each expert (its cheapest slot's)."""
        return self.price[:, -1]

    def counts(self) -> torch.Tensor:
        """[N]: how many experts each token holds."""
        return torch.bincount(self.owner.reshape(-1), minlength=self.n_tokens + 1)[: self.n_tokens]

    def holds(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[B + 1, E] bool: the b-th of ``tokens`` [B] (indices < N, or N = nobody; default: all N) holds
        expert e; the last row: the slots of the other tokens and nobody's."""
        E, C = self.owner.shape
        N = self.n_tokens
        device = self.owner.device
        if tokens is None:
            row, B = self.owner.reshape(-1), N
        else:
            B = len(tokens)
            row = torch.full((N + 1,), B, device=device).scatter_(0, tokens, torch.arange(B, device=device))
            row[N:] = B  # nobody (and the padding of ``tokens``)
            row = row.index_select(0, self.owner.reshape(-1))
        place = row * E + torch.arange(E, device=device).repeat_interleave(C)
        return torch.zeros((B + 1) * E, dtype=torch.bool, device=device).index_fill_(0, place, True).view(B + 1, E)

    def free_violations(self, s: torch.Tensor, eps: torch.Tensor) -> Slots:
        """Free the held slots whose owner gains more than ε by switching to an expert it does not hold at
        today's prices (s [N, E]); a freed slot costs what its expert's cheapest slot costs (so no expert
        gets cheaper, and every other pair keeps its ε-complementary slackness)."""
        holds = self.holds()[:-1]
        prices = self.expert_prices()
        best_other = (s - prices).masked_fill(holds, float("-inf")).amax(1)
        best_other = torch.cat([best_other, best_other.new_full((1,), float("-inf"))])
        N = self.n_tokens
        experts = torch.arange(s.shape[1], device=s.device)[:, None]
        gain = s[self.owner.clamp_max(N - 1), experts] - self.price
        violated = (self.owner < N) & (gain < best_other[self.owner] - eps)
        price, order = torch.where(violated, prices[:, None], self.price).sort(dim=1, descending=True, stable=True)
        return Slots(price, self.owner.masked_fill(violated, N).gather(1, order), N)

    def take(self, bids: torch.Tensor, bidders: torch.Tensor, experts: torch.Tensor) -> Slots:
        """Each of ``experts`` [U] (E: none) keeps the C highest of its slots and its bids [U, W] (sorted
        descending along each row, −inf: no bid) from ``bidders`` [U, W]; a slot stays ahead of an equal bid.
        Two sorted lists merge by rank: an entry's place is its own index plus the number of entries of the
        other list ahead of it. Only the U rows bid for are merged (a spare row E takes the padding)."""
        E, C = self.price.shape
        W = bids.shape[1]
        device = bids.device
        price = torch.cat([self.price, self.price.new_zeros(1, C)])
        owner = torch.cat([self.owner, self.owner.new_full((1, C), self.n_tokens)])
        old_price, old_owner = price.index_select(0, experts), owner.index_select(0, experts)
        slot_rank = torch.arange(C, device=device) + torch.searchsorted(-bids, -old_price, side="left")
        bid_rank = torch.arange(W, device=device) + torch.searchsorted(-old_price, -bids, side="right")
        new_price = bids.new_empty(len(experts), C + W).scatter_(1, slot_rank, old_price).scatter_(1, bid_rank, bids)
        new_owner = bidders.new_empty(len(experts), C + W).scatter_(1, slot_rank, old_owner).scatter_(
            1, bid_rank, bidders)
        price.index_copy_(0, experts, new_price[:, :C])
        owner.index_copy_(0, experts, new_owner[:, :C])
        return Slots(price[:E], owner[:E], self.n_tokens)


def bidding_round(s: torch.Tensor, want: torch.Tensor, k: int, slots: Slots, eps: torch.Tensor, size: int) -> Slots:
    """Every token (s [N, E], wanting ``want`` [N] ≤ k experts) that is short bids, ``size`` bids at most in all
    (≥ the unmet demand); every expert keeps its C best slots and bids. (index_select rather than indexing:
    faster on the CPU.)"""
    N, E = s.shape
    C = slots.price.shape[1]
    demand = want - slots.counts()
    bidders = torch.nonzero_static(demand > 0, size=min(size, N), fill_value=N).squeeze(1)  # [B], N pads
    B = len(bidders)
    rows = bidders.clamp_max(N - 1)
    short = torch.where(bidders < N, demand.index_select(0, rows), 0)[:, None]  # [B, 1]
    s_rows = s.index_select(0, rows)
    value = (s_rows - slots.expert_prices()).masked_fill(slots.holds(bidders)[:-1], float("-inf"))
    threshold = value.topk(k + 1, dim=1).values.gather(1, short)  # the (d+1)-th best value [B, 1]
    chosen = first_by_index(value, threshold, short, dim=1)  # the d best, ties to the lower expert
    # the bids as a list, by bidder (= by token) then expert; padding (flat index B·E): expert E, bid −inf
    flat = torch.nonzero_static(chosen.view(-1), size=min(size, B * k), fill_value=B * E).squeeze(1)
    pad = flat == B * E
    bidder = torch.div(flat, E, rounding_mode="floor").clamp_max(B - 1)
    bid = s_rows.view(-1).index_select(0, flat.clamp_max(B * E - 1)) - threshold.view(-1).index_select(0, bidder)
    bid = (bid + eps).masked_fill(pad, float("-inf"))
    expert = torch.where(pad, E, flat % E)
    bid, order = bid.sort(descending=True, stable=True)  # equal bids: the lower token first
    expert, by_expert = expert.index_select(0, order).sort(stable=True)  # then grouped by expert
    order = order.index_select(0, by_expert)
    bid = bid.index_select(0, by_expert)
    token = bidders.index_select(0, bidder.index_select(0, order))
    rank = torch.arange(len(order), device=s.device) - torch.searchsorted(expert, expert)  # within its expert
    # one row for each expert bid for (U at most), with its C best bids at most (only those can win)
    U, width = min(E, len(order)), min(C, len(order))
    first = (rank == 0) & (expert < E)
    row = first.cumsum(0) - 1
    experts = expert.new_full((U + 1,), E).scatter_(0, torch.where(first, row, U), expert)[:U]  # E pads
    place = torch.where((expert < E) & (rank < width), row * width + rank, U * width)
    bids = bid.new_full((U * width + 1,), float("-inf")).scatter_(0, place, bid)[:-1].view(U, width)
    owners = token.new_full((U * width + 1,), N).scatter_(0, place, token)[:-1].view(U, width)
    return slots.take(bids, owners, experts)


def sequential_bids(s: np.ndarray, want: np.ndarray, slots: Slots, eps: float, budget: int) -> tuple[Slots, int]:
    """The end of a phase, one bid at a time on the host (Gauss-Seidel): the short tokens, s [N, E] and want [N]
    as numpy arrays, bid in turn (lowest index first, then each displaced token in the order it was
    displaced), by the rule of ``bidding_round``: token t, short by d, bids s[t, e] − w + ε for each of its d
    best values v_e = s[t, e] − p_e (ties to the lower expert; w the (d+1)-th best), and each such bid takes
    expert e's cheapest slot, placed after the slots of an equal price. At most ``budget`` bids; returns the
    slots (on the slots' device) and the number of bids made. The late rounds of a phase have a few bidders
    each (a displaced token displaces the next): one host step per bid instead of a round of device ops."""
    price, owner = slots.price.cpu().numpy().copy(), slots.owner.cpu().numpy().copy()
    N, (E, C) = slots.n_tokens, price.shape
    holds = np.zeros((N + 1, E), dtype=bool)  # the last row: nobody's slots
    holds[owner.reshape(-1), np.repeat(np.arange(E), C)] = True
    demand = want - holds[:N].sum(1)
    queue = deque(np.flatnonzero(demand > 0).tolist())
    eps = price.dtype.type(eps)
    bids = 0
    while queue and bids < budget:
        t = queue.popleft()
        d = int(demand[t])
        if d == 0:  # queued twice: served since
            continue
        value = s[t] - price[:, -1]
        value[holds[t]] = -np.inf
        if d == 1:  # most bids: the first best (ties: the lower expert), then the best of the others
            best = [int(value.argmax())]
            value[best[0]] = -np.inf
            w = value.max()
        else:
            order = (-value).argsort(kind="stable")
            best, w = order[:d].tolist(), value[order[d]]
        for e in best:
            bid = s[t, e] - w + eps
            displaced = int(owner[e, -1])
            at = int((-price[e, :-1]).searchsorted(-bid, side="right"))  # after every slot of price ≥ bid
            price[e, at + 1:], owner[e, at + 1:] = price[e, at:-1].copy(), owner[e, at:-1].copy()
            price[e, at], owner[e, at] = bid, t
            holds[t, e] = True
            if displaced < N:
                holds[displaced, e] = False
                demand[displaced] += 1
                queue.append(displaced)
        demand[t] = 0
        bids += 1
    device = slots.price.device
    return Slots(torch.from_numpy(price).to(device), torch.from_numpy(owner).to(device), N), bids


def first_by_index(x: torch.Tensor, threshold: torch.Tensor, count: torch.Tensor, dim: int) -> torch.Tensor:
    """Along ``dim``: the entries above ``threshold``, then those equal to it in index order, ``count`` in all
    (the threshold being the count-th largest, or the (count+1)-th)."""
    above = x > threshold
    tied = x == threshold
    room = count - above.sum(dim, keepdim=True)
    return above | (tied & (tied.cumsum(dim) <= room))


def fill_round_robin(holds: torch.Tensor, short: torch.Tensor, k: int, capacity: int) -> torch.Tensor:
    """Complete an unfinished auction, holds [T, E] bool: the short tokens [T] give up what they hold, then take
    the free slots in expert order, slot j going to the (j mod n)-th of the n short tokens; if some expert has
    more free slots than there are short tokens (two would go to one token), every token is refilled."""
    holds = holds & ~short[:, None]
    free = (capacity - holds.sum(0)).clamp_max(int(short.sum()))
    if int(free.sum()) < int(short.sum()) * k:
        holds, short = torch.zeros_like(holds), torch.ones_like(short)
        free = torch.full_like(free, capacity)
    tokens = short.nonzero().squeeze(1)
    slots = torch.repeat_interleave(torch.arange(holds.shape[1], device=holds.device), free)[: len(tokens) * k]
    holds[tokens[torch.arange(len(slots), device=holds.device) % len(tokens)], slots] = True
    return holds
