"""Plain PyTorch expert matmuls: the readable oracle the fast paths are tested against.

Shapes: T tokens, K selected experts per token, E experts, D model width, G expert width.
"""

from __future__ import annotations

import torch


def expert_up_reference(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """h[t, k] = x[t] @ weight[indices[t, k]].  x [T, D], weight [E, D, G], indices [T, K] → [T, K, G]."""
    return torch.einsum("td,tkdg->tkg", x, weight[indices])


def expert_down_reference(
    h: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor | None = None
) -> torch.Tensor:
    """y[t] = Σ_k gates[t, k] · h[t, k] @ weight[indices[t, k]].

    h [T, K, G], weight [E, G, D], indices [T, K], gates [T, K] or None (all ones) → y [T, D].
    """
    out = torch.einsum("tkg,tkgd->tkd", h, weight[indices])
    if gates is not None:
        out = out * gates.unsqueeze(-1)
    return out.sum(dim=1)
