"""Bench section "gpu": the same expert-bank product on a GPU: Triton kernels vs the dense FFN (cuBLAS) vs the
torch path.

Runs only when CUDA is available; otherwise its rows say "not measured (no GPU)".
"""

from __future__ import annotations

import torch

from sffn_lab.bench.problem import ExpertProblem, sparse_moe
from sffn_lab.bench.records import NOT_MEASURED_NO_GPU, Measurement, with_ratios
from sffn_lab.bench.sizes import BenchSizes
from sffn_lab.bench.timing import interleaved_medians
from sffn_lab.layers.dense import DenseFFN

DENSE = "dense FFN (cuBLAS)"
VARIANTS = (DENSE, "Triton kernels", "torch path, grouped (torch._grouped_mm for bf16, else split + matmul)")


def gpu(sizes: BenchSizes) -> list[Measurement]:
    if not torch.cuda.is_available():
        return [Measurement("gpu", sizes.case(), name, "time_ms", None, status=NOT_MEASURED_NO_GPU)
                for name in VARIANTS]
    problem = ExpertProblem.random(
        sizes.tokens, sizes.d_model, sizes.n_experts, sizes.expert_size, sizes.top_k, device="cuda"
    )
    dense = DenseFFN(sizes.d_model, sizes.d_ff).cuda()
    variants = {
        DENSE: problem.fwd_bwd(lambda x, *_: dense(x.unsqueeze(0)).y.squeeze(0)),
        VARIANTS[1]: problem.fwd_bwd(sparse_moe(backend="triton")),
        VARIANTS[2]: problem.fwd_bwd(sparse_moe(strategy="grouped")),
    }
    seconds = interleaved_medians(variants, sizes.repeats, sync=torch.cuda.synchronize)
    rows = [Measurement("gpu", f"{sizes.case()} on {torch.cuda.get_device_name()}", name, "time_ms",
                        seconds[name] * 1e3, note="forward+backward, fp32") for name in variants]
    return with_ratios(rows, DENSE)
