"""Triton kernel: gathered, grouped matmul with a scattered (and optionally scaled) output.

    out[dst[r]] = scale[r] · (a[src[r]] @ W[e])        (or W[e]ᵀ with TRANSPOSE_W)

over rows r sorted by expert. The routing plan (on the device) splits every expert's rows into tiles of BLOCK_M rows
that never straddle two experts (``tile_expert``, ``tile_start``, ``tile_end``); each program computes
one BLOCK_M × BLOCK_N tile of one expert, loading the gathered rows of ``a`` block by block; the
grid has a fixed upper bound of tiles and programs of empty tiles (start ≥ end) exit at once.
Accumulation is fp32 whatever the input dtype; IEEE selects IEEE fp32 products for fp32 inputs
(else TF32), UPCAST multiplies bf16 tiles as fp32 (for the interpreter, whose bf16 dot is wrong).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def configs() -> list[triton.Config]:
    if INTERPRETED:  # the CPU interpreter: one small tile, no tuning
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(64, 32, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4), (256, 32, 8, 3)]
    ]


@triton.autotune(configs=configs(), key=["N", "K"])
@triton.jit
def gather_matmul_kernel(
    a_ptr, w_ptr, out_ptr, src_ptr, dst_ptr, scale_ptr,
    tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    N, K,
    stride_am, stride_ak,
    stride_we, stride_wk, stride_wn,
    stride_om, stride_on,
    HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    if start >= end:
        return
    expert = tl.load(tile_expert_ptr + tile)

    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    src = tl.load(src_ptr + rows, mask=row_ok, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        acc = acc * scale[:, None].to(tl.float32)

    dst = tl.load(dst_ptr + rows, mask=row_ok, other=0)
    tl.store(out_ptr + dst[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
