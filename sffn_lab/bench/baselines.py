"""Common ways to compute a top-K MoE layer, written plainly as the bench's points of comparison.

All map x [T, D], keys [E, D, G], values [E, G, D], indices [T, K] (distinct experts per token) and
gates [T, K] to y [T, D] = Σ_k gates[t, k] · relu(x[t] @ keys[e]) @ values[e], e = indices[t, k], and
are differentiated by autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def python_loop_moe(x, keys, values, indices, gates):
    """One Python iteration per expert: boolean masks pick its tokens and gates; y accumulates in place."""
    y = torch.zeros_like(x)
    for e in range(keys.shape[0]):
        chosen = indices == e  # [T, K]
        rows = chosen.any(dim=1)  # [T]
        gate = (gates * chosen).sum(dim=1)[rows].unsqueeze(1)
        y.index_put_((rows,), gate * (torch.relu(x[rows] @ keys[e]) @ values[e]), accumulate=True)
    return y


def gshard_moe(x, keys, values, indices, gates, group_size: int, capacity_factor: float):
    """GShard-style: per group of ``group_size`` tokens, one-hot dispatch / combine tensors [S, E, C] with
    capacity C = ⌈cf·S·K/E⌉ per expert (first choices fill first; assignments beyond C are dropped), and
    einsums that move tokens into the [E, C, D] expert buffers and back.
    """
    T, D = x.shape
    E, K = keys.shape[0], indices.shape[1]
    if T % group_size:
        raise ValueError(f"{T} tokens do not split into groups of {group_size}")
    n, S = T // group_size, group_size
    C = math.ceil(capacity_factor * S * K / E)
    expert = indices.view(n, S, K).transpose(1, 2)  # [n, K, S]: k-major priority
    one_hot = F.one_hot(expert, E).reshape(n, K * S, E)
    position = ((one_hot.cumsum(dim=1) - 1) * one_hot).sum(-1).view(n, K, S)  # slot in the expert's buffer
    kept = position < C
    g, k, s = kept.nonzero(as_tuple=True)
    where = (g, s, expert[g, k, s], position[g, k, s])
    dispatch = x.new_zeros(n, S, E, C).index_put(where, x.new_ones(len(g)))
    combine = x.new_zeros(n, S, E, C).index_put(where, gates.view(n, S, K)[g, s, k])
    expert_in = torch.einsum("nsec,nsd->necd", dispatch, x.view(n, S, D))
    hidden = torch.relu(torch.einsum("necd,edg->necg", expert_in, keys))
    expert_out = torch.einsum("necg,egd->necd", hidden, values)
    return torch.einsum("nsec,necd->nsd", combine, expert_out).reshape(T, D)


def masked_dense_moe(x, keys, values, indices, gates):
    """Every expert on every token (a dense FFN of N_E·G cells); unselected blocks' outputs masked to 0."""
    T, D = x.shape
    E, _, G = keys.shape
    block_gate = x.new_zeros(T, E).scatter(1, indices, gates)  # [T, E]: gate of selected blocks, else 0
    hidden = torch.relu(x @ keys.permute(1, 0, 2).reshape(D, E * G)).view(T, E, G) * block_gate.unsqueeze(2)
    return hidden.view(T, E * G) @ values.reshape(E * G, D)
