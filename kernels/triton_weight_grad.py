"""Triton kernel: per-expert weight gradient from gathered rows.

    dW[e] = Σ_{r in expert e} (scale[r] ·) a[src_a[r]]ᵀ ⊗ b[src_b[r]]        dW [E, I, J]

One program computes an I-block × J-block tile of one expert's gradient, looping over that
expert's rows (``offsets[e] : offsets[e + 1]`` of the sorted order) BLOCK_R at a time; an expert
with no rows gets zeros. Accumulation is fp32; IEEE and UPCAST as in ``triton_gather_matmul``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sffn_lab.kernels.triton_gather_matmul import INTERPRETED


def configs() -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config({"BLOCK_I": 32, "BLOCK_J": 32, "BLOCK_R": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_R": br}, num_warps=w, num_stages=s)
        for bi, bj, br, w, s in [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 3)]
    ]


@triton.autotune(configs=configs(), key=["d_in", "J"])
@triton.jit
def weight_grad_kernel(
    a_ptr, b_ptr, out_ptr, src_a_ptr, src_b_ptr, scale_ptr, offsets_ptr,
    d_in, J,
    stride_am, stride_ai,
    stride_bm, stride_bj,
    stride_oe, stride_oi, stride_oj,
    HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    expert = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = i < d_in
    j_ok = j < J

    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        src_a = tl.load(src_a_ptr + rows, mask=row_ok, other=0)
        src_b = tl.load(src_b_ptr + rows, mask=row_ok, other=0)
        a = tl.load(a_ptr + src_a[:, None] * stride_am + i[None, :] * stride_ai,
                    mask=row_ok[:, None] & i_ok[None, :], other=0.0)
        b = tl.load(b_ptr + src_b[:, None] * stride_bm + j[None, :] * stride_bj,
                    mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
            b = (b.to(tl.float32) * scale[:, None].to(tl.float32)).to(b.dtype)
        if UPCAST:
            acc += tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(tl.trans(a), b, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b)

    tl.store(out_ptr + expert * stride_oe + i[:, None] * stride_oi + j[None, :] * stride_oj,
             acc.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])
