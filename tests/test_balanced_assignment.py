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
    assert_within_eps_of_the_optimum(scores, k, balanced_assignment(scores, k).experts)


@pytest.mark.parametrize("T, E, k, rank", [(256, 8, 1, 4), (100, 7, 1, 4), (64, 8, 2, 4), (50, 7, 2, 3),
                                           (60, 20, 3, 3)])
@pytest.mark.parametrize("start", ["another batch's", "far off"])
def test_a_warm_start_keeps_the_guarantee(T, E, k, rank, start):
    """Started from the prices of another batch of the same router (as in training) or from prices three
    score ranges away from any equilibrium, the auction still ends within E·C·ε of the optimum."""
    router = torch.randn(rank, E, dtype=torch.float64)
    scores, other = ((torch.randn(T, rank, dtype=torch.float64) @ router).float() for _ in range(2))
    prices = balanced_assignment(other, k).prices if start == "another batch's" else 3 * torch.randn(E)
    assert_within_eps_of_the_optimum(scores, k, balanced_assignment(scores, k, prices).experts)


def test_a_warm_start_from_another_batch_bids_less(monkeypatch):
    """The point of the warm start: from the prices of another batch of the same router the auction skips its
    first phase and needs fewer rounds of device operations (at the same host bids give or take)."""
    work = {"rounds": 0, "host bids": 0}
    real_round, real_sequential = auction.bidding_round, auction.sequential_bids

    def counted_round(*args):
        work["rounds"] += 1
        return real_round(*args)

    def counted_sequential(*args, **kwargs):
        slots, bids = real_sequential(*args, **kwargs)
        work["host bids"] += bids
        return slots, bids

    monkeypatch.setattr(auction, "bidding_round", counted_round)
    monkeypatch.setattr(auction, "sequential_bids", counted_sequential)
    router = torch.randn(8, 16, dtype=torch.float64)
    first, second = ((torch.randn(2048, 8, dtype=torch.float64) @ router).float() for _ in range(2))
    prices = balanced_assignment(first, 2).prices
    results = {}
    for start in ("cold", "warm"):
        work.update({"rounds": 0, "host bids": 0})
        experts = balanced_assignment(second, 2, prices if start == "warm" else None).experts
        results[start] = dict(work, total=float(second.double().gather(1, experts).sum()))
    print(results)
    # rounds as the auction counts them against max_rounds: a host bid is 1/TAIL_BIDS of a round
    work = {start: r["rounds"] + r["host bids"] / auction.TAIL_BIDS for start, r in results.items()}
    assert results["warm"]["rounds"] < results["cold"]["rounds"] and work["warm"] < work["cold"]
    # both within E·C·ε of the optimum (and fp32 rounding of the bids), so of each other
    bound = 16 * 256 * EPS_FINAL * float(second.max() - second.min()) + 1e-6 * results["cold"]["total"]
    assert abs(results["cold"]["total"] - results["warm"]["total"]) <= bound


def assert_within_eps_of_the_optimum(scores: torch.Tensor, k: int, indices: torch.Tensor) -> None:
    """indices [T, k]: k distinct experts per token, at most C per expert (exactly C when E divides T·k), and a
    total score within E·C·ε of ``optimal_total``."""
    T, E = scores.shape
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
    assert balanced_assignment(torch.zeros(4, 2), 1).experts.view(-1).tolist() == [0, 0, 1, 1]
    scores = low_rank_scores(12, 4, 2).repeat(4, 1)  # every token four times
    assert torch.equal(balanced_assignment(scores, 2).experts, balanced_assignment(scores.clone(), 2).experts)


def test_non_finite_scores_count_as_the_lowest():
    scores = low_rank_scores(32, 4, 3)
    scores[0] = float("-inf")
    scores[1, 2] = float("nan")
    counts = torch.bincount(balanced_assignment(scores, 1).experts.view(-1), minlength=4)
    assert torch.equal(counts, torch.full((4,), 8))


def test_an_unfinished_last_phase_returns_the_last_finished_one(monkeypatch):
    """Phase 2 of 2 frees every slot and then never bids: the answer is phase 1's (ε = EPS_START · range)."""
    scores = low_rank_scores(60, 6, 3)
    first = balanced_assignment(scores, 2, eps_final=auction.EPS_START, n_phases=1).experts
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
    assert torch.equal(balanced_assignment(scores, 2, n_phases=2).experts, first)


real_fill = auction.fill_round_robin


@pytest.mark.parametrize("k", [1, 3])
def test_an_auction_that_never_finishes_is_completed_exactly(k, monkeypatch):
    """One round per phase (and no host tail) leaves tokens short in every phase; the round-robin fill still
    gives exact loads and distinct experts."""
    monkeypatch.setattr(auction, "TAIL_BIDS", 0)
    filled = []
    monkeypatch.setattr(auction, "fill_round_robin", lambda *a: filled.append(1) or real_fill(*a))
    indices = balanced_assignment(low_rank_scores(60, 6, 3), k, max_rounds=1).experts
    assert filled == [1]
    assert torch.equal(torch.bincount(indices.view(-1), minlength=6), torch.full((6,), 10 * k))
    assert all(len(set(row)) == k for row in indices.tolist())


def test_every_expert_when_k_is_the_number_of_experts():
    assert balanced_assignment(torch.randn(5, 3), 3).experts.tolist() == [[0, 1, 2]] * 5
