"""BASE's balanced assignment: the auction against the greedy heuristic it replaced, in one run.

    python scripts/base_assignment.py [--seed 0] [--repeats 5]

Prints the machine, then (1) how far each method's total score is from the optimum of
``scipy.optimize.linear_sum_assignment`` on capacity-expanded scores (K = 1, low-rank scores like W_sel x,
at the shapes of issue 26) and (2) the time per call of each at T 8192 / E 64 (K = 1 and 2), median of
``--repeats`` calls, with the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sffn_lab.layers.balanced_assignment import balanced_assignment


def greedy_assignment(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The heuristic the auction replaced (sffn_lab/layers/routers.py before issue 26), for comparison only:
    K rounds; in each, every unassigned token proposes to its best open expert not taken before and every
    expert accepts its best proposals up to ⌈T/E⌉ (the original's rare swap step for a token with no open
    expert left is not needed at these shapes and raises here)."""
    T, E = scores.shape
    taken = torch.zeros(T, E, dtype=torch.bool)
    columns = []
    for _ in range(k):
        masked = scores.masked_fill(taken, float("-inf"))
        assigned = torch.full((T,), -1, dtype=torch.long)
        remaining = torch.full((E,), -(-T // E), dtype=torch.long)
        while (open_tokens := (assigned < 0).nonzero().squeeze(1)).numel():
            best, proposal = masked[open_tokens].masked_fill(remaining == 0, float("-inf")).max(dim=1)
            if torch.isinf(best).any():
                raise RuntimeError("a token has no open expert left (the original swaps; not reproduced here)")
            by_score = torch.argsort(best, descending=True, stable=True)
            by_expert = by_score[torch.argsort(proposal[by_score], stable=True)]
            experts = proposal[by_expert]
            counts = torch.bincount(experts, minlength=E)
            rank = torch.arange(len(experts)) - (torch.cumsum(counts, 0) - counts)[experts]
            accept = rank < remaining[experts]
            assigned[open_tokens[by_expert[accept]]] = experts[accept]
            remaining -= torch.bincount(experts[accept], minlength=E)
        taken[torch.arange(T), assigned] = True
        columns.append(assigned)
    return torch.stack(columns, dim=1)


def low_rank_scores(T: int, E: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(T, rank, generator=generator, dtype=torch.float64)
    w = torch.randn(rank, E, generator=generator, dtype=torch.float64)
    return (x @ w).float()


def optimum(scores: torch.Tensor) -> float:
    """K = 1: the best total with T/E tokens per expert (each expert's column repeated T/E times)."""
    s = scores.double().numpy()
    C = s.shape[0] // s.shape[1]
    rows, cols = linear_sum_assignment(np.repeat(s, C, axis=1), maximize=True)
    return float(s[rows, cols // C].sum())


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {torch.get_num_threads()} torch threads; torch {torch.__version__}; seed {args.seed}")
    generator = torch.Generator().manual_seed(args.seed)
    print("\nK = 1, low-rank scores: total score short of the optimum (linear_sum_assignment), % of the optimum")
    print("T     E   rank  greedy    auction   (balancing itself costs: unconstrained top-1 above the optimum)")
    for T, E, rank in [(256, 8, 4), (1024, 16, 8), (2048, 64, 16)]:
        scores = low_rank_scores(T, E, rank, generator)
        best = optimum(scores)
        gap = {name: 100 * (best - float(scores.double().gather(1, fn(scores, 1)).sum())) / abs(best)
               for name, fn in (("greedy", greedy_assignment), ("auction", balanced_assignment))}
        free = 100 * (float(scores.double().max(1).values.sum()) - best) / abs(best)
        print(f"{T:<5} {E:<3} {rank:<5} {gap['greedy']:.4f}%   {gap['auction']:.4f}%   ({free:.2f}%)")
    print(f"\ntime per call at T 8192 / E 64 (low-rank 16), median of {args.repeats}")
    print("K  greedy      auction     auction / greedy")
    for k in (1, 2):
        scores = low_rank_scores(8192, 64, 16, generator)
        greedy = median_seconds(lambda s=scores, k=k: greedy_assignment(s, k), args.repeats)
        auction = median_seconds(lambda s=scores, k=k: balanced_assignment(s, k), args.repeats)
        print(f"{k}  {1e3 * greedy:8.1f} ms  {1e3 * auction:8.1f} ms  {auction / greedy:8.1f}x")


if __name__ == "__main__":
    main()
