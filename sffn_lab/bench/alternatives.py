"""Bench section "alternatives": the sparse kernel against common MoE implementations, on the same inputs
(forward+backward).

Also times the torch path's two strategies (``per_expert``, the CPU default, and ``grouped``: one gather
of all pairs and one ``torch._grouped_mm``), the measurement behind the CPU default.
"""

from __future__ import annotations

from functools import partial

from sffn_lab.bench.baselines import gshard_moe, masked_dense_moe, python_loop_moe
from sffn_lab.bench.problem import ExpertProblem, sparse_moe
from sffn_lab.bench.records import Measurement, with_ratios
from sffn_lab.bench.sizes import BenchSizes
from sffn_lab.bench.timing import interleaved_medians

OURS = "sffn kernel (auto)"


def alternatives(sizes: BenchSizes) -> list[Measurement]:
    s = sizes
    problem = ExpertProblem.random(s.tokens, s.d_model, s.n_experts, s.expert_size, s.top_k)
    gshard = f"GShard one-hot einsum (groups of {s.gshard_group}, capacity factor {s.capacity_factor})"
    variants = {
        OURS: sparse_moe(),
        "torch path, grouped strategy (_grouped_mm)": sparse_moe(strategy="grouped"),
        "per-expert Python loop (boolean masks)": python_loop_moe,
        gshard: partial(gshard_moe, group_size=sizes.gshard_group, capacity_factor=sizes.capacity_factor),
        "all experts dense + mask": masked_dense_moe,
    }
    seconds = interleaved_medians({name: problem.fwd_bwd(fn) for name, fn in variants.items()}, sizes.repeats)
    rows = [Measurement("alternatives", sizes.case(), name, "time_ms", seconds[name] * 1e3,
                        note="forward+backward, fp32, random balanced routing; ratio = time / ours")
            for name in variants]
    return with_ratios(rows, OURS)
