"""Bench section "scaling": forward+backward time of the expert bank as N_E, G and K grow, one at a time.

Routing is uniform at random (balanced in expectation), so the rows measure the sparse product alone;
the router's own N_E·D product is not included. Ratios are relative to the bench's base sizes.
"""

from __future__ import annotations

from sffn_lab.bench.problem import ExpertProblem, sparse_moe
from sffn_lab.bench.records import Measurement
from sffn_lab.bench.sizes import BenchSizes
from sffn_lab.bench.timing import interleaved_medians

# size swept → (its label, the BenchSizes field holding its values)
SWEEPS = {
    "n_experts": ("N_E", "sweep_experts"),
    "expert_size": ("G", "sweep_expert_size"),
    "top_k": ("K", "sweep_top_k"),
}


def scaling(sizes: BenchSizes) -> list[Measurement]:
    rows = []
    for field, (label, sweep) in SWEEPS.items():
        values, base = getattr(sizes, sweep), getattr(sizes, field)
        cases = {}
        for value in values:
            dims = {"n_experts": sizes.n_experts, "expert_size": sizes.expert_size, "top_k": sizes.top_k}
            dims[field] = value
            problem = ExpertProblem.random(sizes.tokens, sizes.d_model, **dims)
            cases[f"{label}={value}"] = problem.fwd_bwd(sparse_moe())
        seconds = interleaved_medians(cases, sizes.repeats)
        reference = f"{label}={base}"
        for value in values:
            name = f"{label}={value}"
            rows.append(Measurement(
                f"scaling_{label}", name, "sigma_moe expert bank", "time_ms", seconds[name] * 1e3,
                ratio=seconds[name] / seconds[reference], reference=reference, x=value,
                note=f"T={sizes.tokens} D={sizes.d_model}, others at N_E={sizes.n_experts} "
                f"G={sizes.expert_size} K={sizes.top_k}; random balanced routing",
            ))
    return rows
