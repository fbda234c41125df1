"""Is a run better than the baseline? The difference of their final metrics with a 95% confidence interval.

Seeds pair runs: when a run and the baseline were trained on the same seeds (same data order and init
seed), the interval is the paired one, t_{n−1} on the per-seed differences; otherwise Welch's, with the
Welch–Satterthwaite degrees of freedom. The metrics here (bits, perplexity) are lower-is-better, so an
interval entirely below 0 is "better", entirely above 0 "worse", and one that contains 0 says the seeds
cannot tell the runs apart: "no difference at n = …".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

LEVEL = 0.95


@dataclass
class Difference:
    """mean(run) − mean(baseline) with its confidence interval [low, high] at ``LEVEL``."""

    delta: float
    low: float
    high: float
    n: int  # seeds (pairs when paired; the smaller group otherwise)
    paired: bool

    @property
    def verdict(self) -> str:
        if self.high < 0:
            return "better"
        if self.low > 0:
            return "worse"
        return f"no difference at n = {self.n}"


def difference(run: dict[int, float], baseline: dict[int, float], level: float = LEVEL) -> Difference | None:
    """The run's final metric per seed against the baseline's; None when a side has fewer than 2 seeds
    (no spread to build an interval from)."""
    shared = sorted(set(run) & set(baseline))
    if len(shared) >= 2 and len(shared) == len(run) == len(baseline):
        diffs = [run[s] - baseline[s] for s in shared]
        n = len(diffs)
        mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(n)
        half = stats.t.ppf(0.5 + level / 2, n - 1) * se
        return Difference(mean, mean - half, mean + half, n, paired=True)
    a, b = list(run.values()), list(baseline.values())
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    delta = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(delta, delta, delta, min(len(a), len(b)), paired=False)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + level / 2, dof) * se
    return Difference(delta, delta - half, delta + half, min(len(a), len(b)), paired=False)
