"""Triton kernel: gathered, grouped matmul with a scattered (and optionally scaled) output.

    out[dst[r]] = scale[r] · (a[src[r]] @ W[e])        (W[e] read through its strides: W[e]ᵀ works too)

over rows r sorted by expert. The routing plan (on the device) splits every expert's rows into tiles of
BLOCK_M rows that never straddle two experts (``RoutingPlan.tiles``); the wrapper passes the tile tables of
both tile heights the configs use (SMALL_M and LARGE_M rows), so BLOCK_M is autotuned like the other block
sizes. Each program computes one BLOCK_M × BLOCK_N tile of one expert, loading the gathered rows of ``a``
block by block. The grid is one-dimensional with a fixed upper bound of tiles × column blocks; programs of
empty tiles (start ≥ end) exit at once. Programs run in groups of GROUP_M consecutive tiles (one expert's,
mostly) × every column block, so a group's gathered rows and its expert's weight columns are read from L2
rather than from memory once per column block.

Accumulation is fp32 whatever the input dtype; IEEE selects IEEE fp32 products for fp32 inputs (else
TF32), UPCAST multiplies bf16 tiles as fp32 (for the interpreter, whose bf16 dot is wrong).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
GPU_TILE_HEIGHTS = (64, 128)
# The two tile heights of the configs (small, large): the routing plan builds one tile table for each.
TILE_HEIGHTS = (16, 32) if INTERPRETED else GPU_TILE_HEIGHTS


def configs(interpreted: bool = INTERPRETED) -> list[triton.Config]:
    """The autotuned configs; the interpreter gets one small tile (it cannot tune, and is slow).

    Chosen with ``sffn bench --kernel-resources`` (sm_90a, the real call's specialisation, no GPU needed):
    in bf16 and fp16 every config loads its tiles through 16-byte ``cp.async`` and none spills registers;
    128 × 128 tiles spilled 44–1720 bytes per thread at 4, 8 and 16 warps and are left out. Which of these
    is fastest is the autotuner's to measure.
    """
    if interpreted:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    small, large = GPU_TILE_HEIGHTS
    shapes = [(small, 64, 32, 4), (small, 128, 32, 8), (small, 64, 64, 8), (small, 128, 64, 8), (small, 256, 32, 8),
              (large, 64, 32, 8), (large, 64, 64, 8)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=3)
            for bm, bn, bk, w in shapes]


def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop the configs the shape makes wasteful: column or reduction blocks past the next power of two of
    N or K, and tiles of LARGE_M rows where experts average fewer rows than that (most tiles half empty).
    Keeps at least the smallest config."""
    n, k = triton.next_power_of_2(named_args["N"]), triton.next_power_of_2(named_args["K"])
    rows = named_args["rows_hint"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_N"] <= max(n, 64) and c.kwargs["BLOCK_K"] <= max(k, 32)
            and (c.kwargs["BLOCK_M"] == GPU_TILE_HEIGHTS[0] or rows >= c.kwargs["BLOCK_M"])]
    return kept or configs[:1]


@triton.autotune(configs=configs(), key=["N", "K", "stride_wk", "stride_wn", "rows_hint", "HAS_SCALE"],
                 prune_configs_by={"early_config_prune": prune})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["rows_hint"])
def gather_matmul_kernel(
    a_ptr, w_ptr, out_ptr, src_ptr, dst_ptr, scale_ptr,
    small_tiles_ptr, n_small_tiles, large_tiles_ptr, n_large_tiles,
    N, K, rows_hint,
    stride_am, stride_ak,
    stride_we, stride_wk, stride_wn,
    stride_om, stride_on,
    HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, LARGE_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Tile tables long [3, n_*_tiles] (expert, start, end); ``rows_hint`` (mean rows per expert, a power of
    two) only keys the autotuner and its pruning."""
    if BLOCK_M == LARGE_M:
        tiles_ptr = large_tiles_ptr
        n_tiles = n_large_tiles
    else:
        tiles_ptr = small_tiles_ptr
        n_tiles = n_small_tiles
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    per_group = GROUP_M * n_col_blocks
    first_tile = (pid // per_group) * GROUP_M
    group_tiles = tl.minimum(n_tiles - first_tile, GROUP_M)
    tile = first_tile + (pid % per_group) % group_tiles
    pid_n = (pid % per_group) // group_tiles

    start = tl.load(tiles_ptr + n_tiles + tile)
    end = tl.load(tiles_ptr + 2 * n_tiles + tile)
    if start >= end:
        return
    expert = tl.load(tiles_ptr + tile)

    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    # Rows past the tile's end read a valid row instead (their results are never stored), so the gathered
    # rows need no row mask. Columns past N are masked, not clamped: a clamp would hide from the compiler
    # that a row of the weight tile is contiguous, and its loads would be scalar.
    src = tl.load(src_ptr + tl.minimum(rows, end - 1))
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak  # gathered rows: one pointer each
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_ptrs = w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = k0 + ks < K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        acc = acc * scale[:, None].to(tl.float32)

    dst = tl.load(dst_ptr + rows, mask=row_ok, other=0)
    tl.store(out_ptr + dst[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
