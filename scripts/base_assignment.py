"""BASE's balanced assignment: the auction against the greedy heuristic it replaced, in one run.

    python scripts/base_assignment.py [--seed 0] [--repeats 5] [--previous GIT_REF]

Prints the machine, then (1) how far each method's total score is from the optimum of
``scipy.optimize.linear_sum_assignment`` on capacity-expanded scores (K = 1, low-rank scores like W_sel x,
at the shapes of issue 26) and (2) the time per call of each at T 8192 / E 64 (K = 1 and 2) and, for the
auction, at T 3072 / E 128 / K 32 (``cpu_avgk_compute_equal.yaml``'s base_e128), median of ``--repeats``
calls. "auction, warm" starts from the prices the auction returned for another batch of the same router
(scores x W with a new x), as a BASE router does from step to step. ``--previous`` adds the auction as it
was at a git revision (read with ``git show`` into a temporary module) as another column, on the same scores.

    python scripts/base_assignment.py --trained RUN_DIR [--repeats 5]

times the auction instead on the routing scores of a trained BASE model (the run's last checkpoint, its
training batches of steps 0–5 from its own corpus and data seed): each BASE layer's scores of batch b, cold
and warm from the prices it returned for batch b − 1, median over b = 1 … 5 (each call timed ``--repeats``
times, the median taken).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sffn_lab.layers.balanced_assignment import Assignment, balanced_assignment


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


def low_rank_scores(T: int, router: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scores like W_sel x for a router [rank, E]: x [T, rank] · router (fp32)."""
    x = torch.randn(T, router.shape[0], generator=generator, dtype=torch.float64)
    return (x @ router).float()


def low_rank_router(E: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(rank, E, generator=generator, dtype=torch.float64)


def optimum(scores: torch.Tensor) -> float:
    """K = 1: the best total with T/E tokens per expert (each expert's column repeated T/E times)."""
    s = scores.double().numpy()
    C = s.shape[0] // s.shape[1]
    rows, cols = linear_sum_assignment(np.repeat(s, C, axis=1), maximize=True)
    return float(s[rows, cols // C].sum())


def previous_auction(ref: str):
    """``balanced_assignment`` as it was at git revision ``ref``."""
    source = subprocess.run(["git", "show", f"{ref}:sffn_lab/layers/balanced_assignment.py"], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    path = Path(tempfile.mkdtemp()) / "previous_balanced_assignment.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("previous_balanced_assignment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda scores, k: getattr(result := module.balanced_assignment(scores, k), "experts", result)


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def trained_scores(run_dir: Path, batches: int) -> tuple[list[list[torch.Tensor]], int]:
    """The routing scores [T, E] that each BASE router of the run's last checkpoint hands its auction, for its
    training batches of steps 0 … ``batches`` − 1: [batch][layer]; and the routers' K."""
    from sffn_lab.checkpoints import load_checkpoint
    from sffn_lab.data.datamodule import LMDataModule, TrainWindows
    from sffn_lab.layers import routers
    from sffn_lab.run_dir import RunDir

    module = load_checkpoint(RunDir(run_dir).last_checkpoint).train()
    data = LMDataModule.of(module.config)
    d = module.config.data
    windows = TrainWindows(data.split_tokens("train"), d.seq_len, d.batch_size, module.config.train.seed, 0)
    captured = []

    def capture(scores: torch.Tensor, k: int, start: torch.Tensor | None):
        captured[-1].append(scores.clone())
        return Assignment(scores.topk(k, dim=1).indices, scores.new_zeros(scores.shape[1]))

    routers.balanced_assignment = capture
    with torch.no_grad():
        for step in range(batches):
            captured.append([])
            module.model(windows.batch(step)[0])
    if not captured[0]:
        raise SystemExit(f"{run_dir}: no BASE router in this model")
    return captured, module.config.model.ffn.top_k


def time_trained(run_dir: Path, repeats: int) -> None:
    batches, k = trained_scores(run_dir, 6)
    print(f"\n{run_dir}: {len(batches[0])} BASE layers, T {batches[0][0].shape[0]}, E {batches[0][0].shape[1]}, "
          f"K {k}; median over batches 1-5 of the median of {repeats} calls; total score in brackets")
    print("layer  cold                      warm                      cold / warm")
    for layer in range(len(batches[0])):
        cells = {"cold": [], "warm": []}
        for b in range(1, len(batches)):
            scores, previous = batches[b][layer], batches[b - 1][layer]
            prices = balanced_assignment(previous, k).prices
            for name, start in (("cold", None), ("warm", prices)):
                seconds = median_seconds(lambda s=scores, start=start: balanced_assignment(s, k, start), repeats)
                total = float(scores.double().gather(1, balanced_assignment(scores, k, start).experts).sum())
                cells[name].append((seconds, total))
        cold, warm = (statistics.median(t for t, _ in cells[name]) for name in ("cold", "warm"))
        totals = {name: sum(total for _, total in cells[name]) for name in cells}
        print(f"{layer:<6} {1e3 * cold:7.1f} ms ({totals['cold']:.1f})    {1e3 * warm:7.1f} ms ({totals['warm']:.1f})"
              f"    {cold / warm:.1f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--previous", metavar="GIT_REF", help="also time the auction as it was at this revision")
    parser.add_argument("--trained", metavar="RUN_DIR", type=Path, help="time cold and warm on a trained BASE model")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {torch.get_num_threads()} torch threads; torch {torch.__version__}; seed {args.seed}")
    if args.trained:
        time_trained(args.trained, args.repeats)
        return
    methods = {"greedy": greedy_assignment, "auction": lambda scores, k: balanced_assignment(scores, k).experts}
    if args.previous:
        methods[f"auction@{args.previous}"] = previous_auction(args.previous)
    generator = torch.Generator().manual_seed(args.seed)
    print("\nK = 1, low-rank scores: total score short of the optimum (linear_sum_assignment), % of the optimum")
    print("(balancing itself costs: unconstrained top-1 above the optimum)")
    print("T     E   rank  " + "".join(f"{name:<20}" for name in methods) + "balancing costs")
    for T, E, rank in [(256, 8, 4), (1024, 16, 8), (2048, 64, 16)]:
        scores = low_rank_scores(T, low_rank_router(E, rank, generator), generator)
        best = optimum(scores)
        gaps = [100 * (best - float(scores.double().gather(1, fn(scores, 1)).sum())) / abs(best)
                for fn in methods.values()]
        free = 100 * (float(scores.double().max(1).values.sum()) - best) / abs(best)
        print(f"{T:<5} {E:<3} {rank:<5} " + "".join(f"{gap:<20.4f}" for gap in gaps) + f"{free:.2f}%")
    print(f"\ntime per call (low-rank 16), median of {args.repeats}; total score in brackets")
    print("T     E    K   " + "".join(f"{name:<28}" for name in [*methods, "auction, warm"]))
    for T, E, k in [(8192, 64, 1), (8192, 64, 2), (3072, 128, 32)]:
        router = low_rank_router(E, 16, generator)
        scores = low_rank_scores(T, router, generator)
        prices = balanced_assignment(low_rank_scores(T, router, generator), k).prices
        warm = {"auction, warm": lambda scores, k, prices=prices: balanced_assignment(scores, k, prices).experts}
        cells = []
        for fn in [*methods.values(), *warm.values()]:
            try:
                seconds = median_seconds(lambda s=scores, k=k, fn=fn: fn(s, k), args.repeats)
            except RuntimeError:  # the greedy heuristic's swap step is not reproduced (see greedy_assignment)
                cells.append("fails: no open expert")
                continue
            total = float(scores.double().gather(1, fn(scores, k)).sum())
            cells.append(f"{1e3 * seconds:.1f} ms ({total:.1f})")
        print(f"{T:<5} {E:<4} {k:<3} " + "".join(f"{cell:<28}" for cell in cells))

if __name__ == "__main__":
    main()
