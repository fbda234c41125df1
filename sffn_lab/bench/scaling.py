"""Bench section "scaling": forward+backward time of the expert bank as N_E, G and K grow, one at a time,
each beside its limit, the FLOP-matched dense FFN (d_ff = K·G: the same multiply-adds as plain GEMMs).

Routing is uniform at random (balanced in expectation), so the rows measure the sparse product alone;
the router's own N_E·D product is not included. The bank's ratios are relative to the bench's base sizes;
each dense row's ratio is the bank's time at that point over the dense time (1.0: at the limit).
"""

from __future__ import annotations

from sffn_lab.bench.problem import ExpertProblem, dense_ffn_fwd_bwd, sparse_moe
from sffn_lab.bench.records import Measurement
from sffn_lab.bench.sizes import BenchSizes
from sffn_lab.bench.timing import interleaved_medians

# size swept → (its label, the BenchSizes field holding its values)
SWEEPS = {
    "n_experts": ("N_E", "sweep_experts"),
    "expert_size": ("G", "sweep_expert_size"),
    "top_k": ("K", "sweep_top_k"),
}


BANK = "sigma_moe expert bank"
LIMIT = "FLOP-matched dense FFN (d_ff = K·G)"


def scaling(sizes: BenchSizes) -> list[Measurement]:
    rows = []
    for field, (label, sweep) in SWEEPS.items():
        values, base = getattr(sizes, sweep), getattr(sizes, field)
        cases, limits = {}, {}
        for value in values:
            dims = {"n_experts": sizes.n_experts, "expert_size": sizes.expert_size, "top_k": sizes.top_k}
            dims[field] = value
            problem = ExpertProblem.random(sizes.tokens, sizes.d_model, **dims)
            cases[f"{label}={value}"] = problem.fwd_bwd(sparse_moe())
            d_ff = dims["top_k"] * dims["expert_size"]
            limits[value] = f"dense d_ff={d_ff}"
            cases.setdefault(limits[value], dense_ffn_fwd_bwd(sizes.tokens, sizes.d_model, d_ff))
        seconds = interleaved_medians(cases, sizes.repeats)
        reference = f"{label}={base}"
        note = (f"T={sizes.tokens} D={sizes.d_model}, others at N_E={sizes.n_experts} G={sizes.expert_size} "
                f"K={sizes.top_k}; random balanced routing")
        for value in values:
            name = f"{label}={value}"
            rows.append(Measurement(f"scaling_{label}", name, BANK, "time_ms", seconds[name] * 1e3,
                                    ratio=seconds[name] / seconds[reference], reference=reference, x=value, note=note))
            dense = seconds[limits[value]]
            rows.append(Measurement(f"scaling_{label}", name, LIMIT, "time_ms", dense * 1e3,
                                    ratio=seconds[name] / dense, reference=name, x=value,
                                    note=f"{limits[value]}; ratio = the bank's time / this"))
    return rows
