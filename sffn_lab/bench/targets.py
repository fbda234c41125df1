"""The ratios the sparse path aims at (time and memory against dense, flat in N_E, ahead of other MoE
implementations, LM throughput), checked against a bench run's measurements."""

from __future__ import annotations

from dataclasses import dataclass

from sffn_lab.bench.layer_vs_dense import FLOP_MATCHED
from sffn_lab.bench.records import Measurement
from sffn_lab.bench.scaling import BANK


@dataclass
class TargetCheck:
    what: str  # the ratio measured
    measured: float | None  # the ratio the target is about (None: not measured)
    target: str
    met: bool | None


def _ratio(rows: list[Measurement], section: str, variant: str, metric: str = "time_ms") -> float:
    return next(r.ratio for r in rows if r.section == section and r.variant == variant and r.metric == metric)


def check_targets(rows: list[Measurement]) -> list[TargetCheck]:
    checks = []

    def at_most(what, value, limit):
        checks.append(TargetCheck(what, value, f"≤ {limit}", value <= limit))

    def at_least(what, value, limit):
        checks.append(TargetCheck(what, value, f"≥ {limit}", value >= limit))

    at_most("σ-MoE / dense fwd+bwd time", _ratio(rows, "layer", "sigma_moe"), 0.30)
    at_most("σ-MoE / FLOP-matched dense fwd+bwd time (the limit)",
            _ratio(rows, "layer", "sigma_moe") / _ratio(rows, "layer", FLOP_MATCHED), 1.15)
    at_most("σ-MoE / dense activation memory", _ratio(rows, "layer", "sigma_moe", "activation_MB"), 0.5)
    largest = max((r for r in rows if r.section == "scaling_N_E" and r.variant == BANK), key=lambda r: r.x)
    at_most(f"time at {largest.case} / at {largest.reference}", largest.ratio, 1.15)
    for r in rows:
        if r.section == "alternatives" and r.variant.startswith(("GShard", "all experts")):
            at_least(f"{r.variant} time / ours", r.ratio, 3.0)
    for r in rows:
        if r.section == "lm" and r.variant == "sigma_moe":
            limit = 1.25 if r.case.startswith("default") else 1.6
            at_least(f"σ-MoE LM / dense LM train tokens/s, {r.case}", r.ratio, limit)
    gpu = [r for r in rows if r.section == "gpu"]
    checks.append(TargetCheck("GPU mode", None, "measured when a GPU is present",
                              None if gpu[0].value is None else True))
    return checks

