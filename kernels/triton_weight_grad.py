"""Triton kernels: per-expert weight gradient from gathered rows.

    dW[e] = Σ_{r in expert e} (scale[r] ·) a[src_a[r]]ᵀ ⊗ b[src_b[r]]        dW [E, I, J]

Each expert's sorted rows are cut into spans of at most ``span_rows`` rows (``RoutingPlan.tiles``). One
program computes an I-block × J-block tile of the sum over one span, BLOCK_R rows at a time. An expert with
one span (the common case when ``span_rows`` is a few times the mean rows per expert) writes its tile into dW
directly; an expert cut into several spans (one much busier than the rest, or few experts that would leave
the GPU idle) writes fp32 partial sums, and ``sum_spans_kernel`` adds them in order into dW (deterministic, no
atomics) and writes zeros for experts without rows. So the busiest program walks at most ``span_rows`` rows,
however skewed the routing.

A span's programs (every I × J block) are adjacent in launch order, so its gathered rows are read from L2.
Accumulation is fp32; IEEE and UPCAST as in ``triton_gather_matmul``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sffn_lab.kernels.triton_gather_matmul import INTERPRETED


def configs(interpreted: bool = INTERPRETED) -> list[triton.Config]:
    """The autotuned configs; the interpreter gets one small tile."""
    if interpreted:
        return [triton.Config({"BLOCK_I": 32, "BLOCK_J": 32, "BLOCK_R": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_R": br}, num_warps=w, num_stages=s)
        for bi, bj, br, w, s in [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 3),
                                 (64, 64, 64, 4, 3)]
    ]


def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop blocks past the next power of two of I or J and row steps longer than a span's mean rows;
    keeps at least the first config."""
    i, j = triton.next_power_of_2(named_args["d_in"]), triton.next_power_of_2(named_args["J"])
    rows = named_args["rows_hint"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_I"] <= max(i, 64) and c.kwargs["BLOCK_J"] <= max(j, 64)
            and c.kwargs["BLOCK_R"] <= max(rows, 32)]
    return kept or configs[:1]


@triton.autotune(configs=configs(), key=["d_in", "J", "rows_hint", "HAS_SCALE"],
                 prune_configs_by={"early_config_prune": prune})
@triton.jit(do_not_specialize=["rows_hint"])
def weight_grad_kernel(
    a_ptr, b_ptr, grad_ptr, partial_ptr, src_a_ptr, src_b_ptr, scale_ptr, spans_ptr, first_ptr, n_spans, span_rows,
    d_in, J, rows_hint,
    stride_am, stride_ai,
    stride_bm, stride_bj,
    stride_os, stride_oi, stride_oj,
    HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Span table long [3, n_spans] (expert, start, end; a span is start : min(start + span_rows, end)), ``first``
    long [E + 1] (expert e's spans are first[e] : first[e + 1]); grad [E, I, J] and the fp32 partial sums
    [n_spans, I, J] share their strides (os, oi, oj). ``rows_hint`` (mean rows per span, a power of two) only
    keys the autotuner and its pruning."""
    n_j_blocks = tl.cdiv(J, BLOCK_J)
    n_blocks = tl.cdiv(d_in, BLOCK_I) * n_j_blocks
    span = tl.program_id(0) // n_blocks
    pid_i = tl.program_id(0) % n_blocks // n_j_blocks
    pid_j = tl.program_id(0) % n_j_blocks
    start = tl.load(spans_ptr + n_spans + span)
    end = tl.load(spans_ptr + 2 * n_spans + span)
    if start >= end:  # past the last real span
        return
    stop = tl.minimum(start + span_rows, end)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = i < d_in
    j_ok = j < J

    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for r0 in range(start, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < stop
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

    expert = tl.load(spans_ptr + span)
    tile = i[:, None] * stride_oi + j[None, :] * stride_oj
    ok = i_ok[:, None] & j_ok[None, :]
    if tl.load(first_ptr + expert + 1) - tl.load(first_ptr + expert) == 1:  # the expert's only span: dW itself
        tl.store(grad_ptr + expert.to(tl.int64) * stride_os + tile, acc.to(grad_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(partial_ptr + span.to(tl.int64) * stride_os + tile, acc, mask=ok)


@triton.jit
def sum_spans_kernel(partial_ptr, out_ptr, first_ptr, size, BLOCK: tl.constexpr):
    """out[e, :] = Σ_{s in first[e] : first[e + 1]} partial[s, :] in span order (fp32 sums, out's dtype) for an
    expert cut into several spans; zeros for an expert without spans; nothing for an expert of one span (its
    program wrote out[e] directly). partial fp32 [spans, size], out [E, size], first long [E + 1]."""
    expert = tl.program_id(1)
    first = tl.load(first_ptr + expert)
    last = tl.load(first_ptr + expert + 1)
    if last - first == 1:
        return
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(first, last):
        acc += tl.load(partial_ptr + s * size + cols, mask=ok, other=0.0)  # s: int64, as first
    tl.store(out_ptr + expert.to(tl.int64) * size + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)
