"""``hash``: HashLayer (Roller et al. 2021, random hash): a fixed random hash of the token id picks the experts."""

from __future__ import annotations

from dataclasses import dataclass

from sffn_lab.variants.bank import RouterVariant
from sffn_lab.variants.registry import register


@dataclass
class HashOptions:
    """HashLayer: a fixed random hash of the token id picks the expert."""

    seed: int = 0  # seed of the fixed random token-id → experts table


@register("hash")
class Hash(RouterVariant):
    """A fixed random list of K distinct experts drawn for every token id of the vocabulary (a table
    [vocab_size, K]: no folding of ids into fewer buckets); no gate, no loss."""

    Options = HashOptions
    table_top_k = 1

    @classmethod
    def router_class(cls) -> type:
        from sffn_lab.layers.routers import HashRouter

        return HashRouter
