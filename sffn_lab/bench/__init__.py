"""``sffn bench``: speed and activation memory of the sparse FFN against dense and common alternatives.

One module per concern: sizes (full / quick), records (CSV rows), timing (interleaved medians),
memory (bytes saved for backward), baselines (alternative MoE implementations), the sections
(layer_vs_dense, scaling, alternatives, lm_throughput, gpu), targets, plots, and the runner.
"""

from sffn_lab.bench.runner import run_bench

__all__ = ["run_bench"]
