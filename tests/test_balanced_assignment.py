"""BASE's balanced assignment (the auction) against the optimum from ``scipy.optimize.linear_sum_assignment``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import sffn_lab.layers.balanced_assignment as auction
from sffn_lab.layers.balanced_assignment import EPS_FINAL, balanced_assignment


def optimal_total(scores: torch.Tensor, k: int) -> float:
    """The best total score of k distinct experts per token, at most C = ⌈T·k/E⌉ tokens per expert, solved as
    an assignment problem on capacity-expanded scores (float64).

    k = 1: tokens × (each expert repeated C times). k > 1: each token t is k identical rows, each expert C
    identical columns, and each pair (t, e) a gadget that lets t use e at most once: a column u_te that one
    of t's rows takes at score s[t, e], or else the row w_te takes at 0; w_te's alternatives are e's
    columns, so taking u_te makes w_te fill one of e's slots."""
    s = scores.double().numpy()
    T, E = s.shape
    C = -(-T * k // E)
    if k == 1:
        rows, cols = linear_sum_assignment(np.repeat(s, C, axis=1), maximize=True)
        return float(s[rows, cols // C].sum())
    pairs = np.arange(T * E).reshape(T, E)
    cost = np.full((T * k + T * E, T * E + E * C), np.inf)  # rows: token copies, w; columns: u, expert slots
    cost[np.repeat(np.arange(T * k), E), np.tile(pairs, (1, k)).reshape(-1)] = -np.repeat(s, k, axis=0).reshape(-1)
    cost[T * k + pairs.reshape(-1), pairs.reshape(-1)] = 0
    slot_columns = T * E + np.arange(E * C).reshape(E, C)
    cost[(T * k + pairs)[:, :, None], slot_columns[None]] = 0
    rows, cols = linear_sum_assignment(cost)
    return float(-cost[rows, cols].sum())


def low_rank_scores(T: int, E: int, rank: int) -> torch.Tensor:
    """Routing scores like W_sel x: x [T, rank] · W [rank, E] (fp32)."""
    return (torch.randn(T, rank, dtype=torch.float64) @ torch.randn(rank, E, dtype=torch.float64)).float()


@pytest.mark.parametrize("T, E, k, rank", [
    (256, 8, 1, 4), (1024, 16, 1, 8), (100, 7, 1, 4),  # K = 1; the last: E does not divide T
    (64, 8, 2, 4), (96, 6, 3, 3), (50, 7, 2, 3), (64, 8, 2, 64),  # K > 1; (50, 7, 2): 100 slots of 105
    (128, 32, 1, 4), (60, 20, 3, 3),  # many experts: late rounds bid for a few of them only
])
@pytest.mark.parametrize("tail", [0, auction.TAIL_BIDS])  # rounds of device ops only; a host tail as shipped
def test_auction_is_within_eps_of_the_optimal_balanced_assignment(T, E, k, rank, tail, monkeypatch):
    monkeypatch.setattr(auction, "TAIL_BIDS", tail)
    scores = low_rank_scores(T, E, rank)
    indices = balanced_assignment(scores, k)
    C = -(-T * k // E)
    counts = torch.bincount(indices.reshape(-1), minlength=E)
    assert indices.shape == (T, k) and int(counts.max()) <= C and int(counts.sum()) == T * k
    if T * k % E == 0:
        assert torch.equal(counts, torch.full((E,), C))
    assert all(len(set(row)) == k for row in indices.tolist())
    total = float(scores.double().gather(1, indices).sum())
    best = optimal_total(scores, k)
    eps = EPS_FINAL * float(scores.max() - scores.min())
    print(f"gap {best - total:.3g} = {(best - total) / abs(best):.3%} of the optimum, bound E·C·ε = {E * C * eps:.3g}")
    assert best - total <= E * C * eps + 1e-6 * abs(best)  # + fp32 rounding of the bids


def test_ties_go_to_the_lower_index():
    """All scores equal: tokens 0 and 1 win expert 0 (first among equal bids), 2 and 3 then take expert 1."""
    assert balanced_assignment(torch.zeros(4, 2), 1).view(-1).tolist() == [0, 0, 1, 1]
    scores = low_rank_scores(12, 4, 2).repeat(4, 1)  # every token four times
    assert torch.equal(balanced_assignment(scores, 2), balanced_assignment(scores.clone(), 2))


def test_non_finite_scores_count_as_the_lowest():
    scores = low_rank_scores(32, 4, 3)
    scores[0] = float("-inf")
    scores[1, 2] = float("nan")
    counts = torch.bincount(balanced_assignment(scores, 1).view(-1), minlength=4)
    assert torch.equal(counts, torch.full((4,), 8))


def test_an_unfinished_last_phase_returns_the_last_finished_one(monkeypatch):
    """Phase 2 of 2 frees every slot and then never bids: the answer is phase 1's (ε = EPS_START · range)."""
    scores = low_rank_scores(60, 6, 3)
    first = balanced_assignment(scores, 2, eps_final=auction.EPS_START, n_phases=1)
    real_free = auction.Slots.free_violations
    phases = []

    def stall_in_phase_two(self, s, eps):
        phases.append(eps)
        slots = real_free(self, s, eps)
        if len(phases) < 2:
            return slots
        monkeypatch.setattr(auction, "bidding_round", lambda s, want, k, slots, eps, size: slots)
        monkeypatch.setattr(auction, "sequential_bids", lambda s, want, slots, eps, budget: (slots, budget))
        return auction.Slots(slots.price, torch.full_like(slots.owner, slots.n_tokens), slots.n_tokens)

    monkeypatch.setattr(auction.Slots, "free_violations", stall_in_phase_two)
    assert torch.equal(balanced_assignment(scores, 2, n_phases=2), first)


real_fill = auction.fill_round_robin


@pytest.mark.parametrize("k", [1, 3])
def test_an_auction_that_never_finishes_is_completed_exactly(k, monkeypatch):
    """One round per phase (and no host tail) leaves tokens short in every phase; the round-robin fill still
    gives exact loads and distinct experts."""
    monkeypatch.setattr(auction, "TAIL_BIDS", 0)
    filled = []
    monkeypatch.setattr(auction, "fill_round_robin", lambda *a: filled.append(1) or real_fill(*a))
    indices = balanced_assignment(low_rank_scores(60, 6, 3), k, max_rounds=1)
    assert filled == [1]
    assert torch.equal(torch.bincount(indices.view(-1), minlength=6), torch.full((6,), 10 * k))
    assert all(len(set(row)) == k for row in indices.tolist())


def test_every_expert_when_k_is_the_number_of_experts():
    assert balanced_assignment(torch.randn(5, 3), 3).tolist() == [[0, 1, 2]] * 5
