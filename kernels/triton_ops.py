"""Autograd wrappers of the Triton expert matmuls (the CUDA path; testable on CPU with TRITON_INTERPRET=1).

Precision policy: fp32 inputs are multiplied with IEEE fp32 products (``input_precision="ieee"``),
fp16 / bf16 inputs with the tensor cores' native products; every kernel accumulates in fp32 and
writes the input dtype. The K outputs of a token are written to a [T·K, D] buffer and summed in
PyTorch rather than with atomic adds, so results are deterministic.

Shapes: T tokens, K experts per token, P = T·K pairs, E experts, D model width, G expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from sffn_lab.kernels.triton_gather_matmul import INTERPRETED, gather_matmul_kernel
from sffn_lab.kernels.triton_weight_grad import weight_grad_kernel

BLOCK_M = 16 if INTERPRETED else 64  # rows per tile; tiles never straddle two experts
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Tiles:
    """Pairs sorted by expert (``pairs`` [P], ``tokens`` [P]), expert ``offsets`` [E + 1], and row tiles."""

    pairs: torch.Tensor
    tokens: torch.Tensor
    offsets: torch.Tensor
    tile_expert: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor

    @classmethod
    def of(cls, indices: torch.Tensor, n_experts: int) -> Tiles:
        flat = indices.reshape(-1)
        pairs = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n_experts)
        offsets = torch.zeros(n_experts + 1, dtype=torch.long, device=flat.device)
        offsets[1:] = torch.cumsum(counts, 0)
        n_tiles = (counts + BLOCK_M - 1) // BLOCK_M
        tile_expert = torch.repeat_interleave(torch.arange(n_experts, device=flat.device), n_tiles)
        first_tile = torch.cumsum(n_tiles, 0) - n_tiles
        within = torch.arange(len(tile_expert), device=flat.device) - first_tile[tile_expert]
        tile_start = offsets[tile_expert] + within * BLOCK_M
        tile_end = offsets[tile_expert + 1]
        return cls(pairs, pairs // indices.shape[1], offsets, tile_expert, tile_start, tile_end)


def _check(name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def gather_matmul(a, weight, src, dst, tiles: Tiles, n_out_rows: int, transpose_w: bool = False, scale=None):
    """out[dst[r]] = scale[r] · a[src[r]] @ W[e(r)] (W[e]ᵀ if transpose_w) over sorted rows r → [n_out_rows, N].

    ``scale`` (optional) is indexed by the sorted row r, like ``src`` and ``dst``.
    """
    _check("a", a, 2)
    _check("weight", weight, 3)
    if a.dtype != weight.dtype:
        raise TypeError(f"a and weight must share a dtype, got {a.dtype} and {weight.dtype}")
    K_in, N = (weight.shape[2], weight.shape[1]) if transpose_w else (weight.shape[1], weight.shape[2])
    if a.shape[1] != K_in:
        raise ValueError(f"a has {a.shape[1]} columns but the expert weights expect {K_in}")
    stride_wk, stride_wn = (weight.stride(2), weight.stride(1)) if transpose_w else (weight.stride(1), weight.stride(2))
    out = a.new_zeros(n_out_rows, N)
    if len(tiles.tile_expert) == 0:
        return out

    def grid(meta):
        return (len(tiles.tile_expert), triton.cdiv(N, meta["BLOCK_N"]))

    gather_matmul_kernel[grid](
        a, weight, out, src, dst, scale if scale is not None else out,
        tiles.tile_expert, tiles.tile_start, tiles.tile_end,
        N, K_in,
        a.stride(0), a.stride(1),
        weight.stride(0), stride_wk, stride_wn,
        out.stride(0), out.stride(1),
        HAS_SCALE=scale is not None, IEEE=a.dtype == torch.float32, BLOCK_M=BLOCK_M,
    )
    return out


def weight_grad(a, b, src_a, src_b, tiles: Tiles, shape, scale=None) -> torch.Tensor:
    """dW[e] = Σ_{r of e} a[src_a[r]]ᵀ (scale[r] · b[src_b[r]]) → [E, I, J] (fp32 sums, a's dtype)."""
    E, I, J = shape
    out = torch.zeros(shape, dtype=a.dtype, device=a.device)

    def grid(meta):
        return (E, triton.cdiv(I, meta["BLOCK_I"]), triton.cdiv(J, meta["BLOCK_J"]))

    weight_grad_kernel[grid](
        a, b, out, src_a, src_b, scale if scale is not None else out, tiles.offsets,
        I, J,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        HAS_SCALE=scale is not None, IEEE=a.dtype == torch.float32,
    )
    return out


class TritonExpertUp(torch.autograd.Function):
    """h[t, k] = x[t] @ W[indices[t, k]];  x [T, D], W [E, D, G] → h [T, K, G]."""

    @staticmethod
    def forward(ctx, x, weight, indices):
        T, K = indices.shape
        tiles = Tiles.of(indices, weight.shape[0])
        x = x.contiguous()
        h = gather_matmul(x, weight, tiles.tokens, tiles.pairs, tiles, T * K)
        ctx.save_for_backward(x, weight)
        ctx.tiles = tiles
        return h.view(T, K, -1)

    @staticmethod
    def backward(ctx, grad_h):
        x, weight = ctx.saved_tensors
        tiles = ctx.tiles
        T = x.shape[0]
        grad_h = grad_h.reshape(-1, grad_h.shape[-1]).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            per_pair = gather_matmul(grad_h, weight, tiles.pairs, tiles.pairs, tiles, grad_h.shape[0],
                                     transpose_w=True)
            grad_x = per_pair.view(T, -1, x.shape[1]).sum(1)  # pair p = t·K + k
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(x, grad_h, tiles.tokens, tiles.pairs, tiles, weight.shape)
        return grad_x, grad_w, None


class TritonExpertDown(torch.autograd.Function):
    """y[t] = Σ_k g[t, k] · h[t, k] @ W[indices[t, k]];  h [T, K, G], W [E, G, D] → y [T, D]."""

    @staticmethod
    def forward(ctx, h, weight, indices, gates):
        T, K, G = h.shape
        tiles = Tiles.of(indices, weight.shape[0])
        rows = h.reshape(T * K, G).contiguous()
        flat_gates = gates.reshape(-1).contiguous() if gates is not None else None
        sorted_gates = flat_gates[tiles.pairs] if gates is not None else None  # the kernels read scale by sorted row
        per_pair = gather_matmul(rows, weight, tiles.pairs, tiles.pairs, tiles, T * K, scale=sorted_gates)
        ctx.save_for_backward(rows, weight, flat_gates)
        ctx.tiles, ctx.shape = tiles, (T, K, G)
        return per_pair.view(T, K, -1).sum(1)

    @staticmethod
    def backward(ctx, grad_y):
        rows, weight, flat_gates = ctx.saved_tensors
        tiles = ctx.tiles
        T, K, G = ctx.shape
        grad_y = grad_y.contiguous()
        ungated = gather_matmul(grad_y, weight, tiles.tokens, tiles.pairs, tiles, T * K, transpose_w=True)
        grad_h = grad_w = grad_gates = None
        if flat_gates is not None and ctx.needs_input_grad[3]:
            grad_gates = (ungated.float() * rows.float()).sum(1).to(rows.dtype).view(T, K)
        if ctx.needs_input_grad[0]:
            grad_h = (ungated * flat_gates[:, None] if flat_gates is not None else ungated).view(T, K, G)
        if ctx.needs_input_grad[1]:
            sorted_gates = flat_gates[tiles.pairs] if flat_gates is not None else None
            grad_w = weight_grad(rows, grad_y, tiles.pairs, tiles.tokens, tiles, weight.shape, scale=sorted_gates)
        return grad_h, grad_w, None, grad_gates


def expert_up_triton(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return TritonExpertUp.apply(x, weight, indices)


def expert_down_triton(h, weight, indices, gates=None) -> torch.Tensor:
    return TritonExpertDown.apply(h, weight, indices, gates)
