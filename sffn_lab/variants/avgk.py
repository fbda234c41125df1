"""``avgk``: Avg-K (Liu et al. 2023): score a block by x · mean of its key vectors, top-K blocks."""

from __future__ import annotations

from dataclasses import dataclass

from sffn_lab.variants.bank import RouterVariant
from sffn_lab.variants.registry import register


@dataclass
class AvgKOptions:
    """Avg-K: score a block by x · mean of its key vectors."""

    gate: str = "none"  # "none" (assumed the Avg-K paper's; no source at hand) or "softmax" / "sigmoid" of the scores


@register("avgk")
class AvgK(RouterVariant):
    """Block score = x · mean of the block's key vectors; top-K blocks; no balancing loss."""

    Options = AvgKOptions
    gates = ("none", "softmax", "sigmoid")

    @classmethod
    def router_class(cls) -> type:
        from sffn_lab.layers.routers import AvgKRouter

        return AvgKRouter
