"""The FFN variants: one file each, a class registered under its ``model.ffn.kind`` name.

A new variant is one decorated class (the README's "How to add a variant")::

    from sffn_lab.variants import LinearRouter, Routing, register

    @register("my_router")
    class MyRouter(LinearRouter):
        def forward(self, x, token_ids=None, bank=None) -> Routing:  # x [T, D] → indices, gates [T, K]
            gates, indices = self.logits(x).softmax(-1).topk(self.k, dim=-1)
            return Routing(indices, gates)

``Router``/``LinearRouter`` route to the expert bank (``RouterVariant`` is their torch-free declaration
side); ``Layer`` is a whole FFN layer of its own. Importing this package registers the built-ins, in the
order ``sffn variants`` lists them, without importing torch (so that a mistake in a config is answered
at once): their modules are imported when they are built, and ``Router``, ``LinearRouter`` and
``Routing`` when first named here.
"""

from typing import Any

from sffn_lab.config import PLUGIN_LOADERS
from sffn_lab.variants import plugins
from sffn_lab.variants.bank import RouterVariant
from sffn_lab.variants.cost import Cost
from sffn_lab.variants.layer import Layer
from sffn_lab.variants.registry import Variant, bank_kinds, kinds, register, variant

from sffn_lab.variants import dense, topk, sigma_moe, switch, sbase, base, hash, avgk, pkm  # noqa: F401  isort: skip

_ROUTER_NAMES = ("LinearRouter", "Router", "Routing")
PLUGIN_LOADERS.append(plugins.load)
plugins.load_installed()


def __getattr__(name: str) -> Any:
    """``Router``, ``LinearRouter``, ``Routing``: from ``sffn_lab.layers.routers`` (torch), when first named."""
    if name in _ROUTER_NAMES:
        from sffn_lab.layers import routers

        return getattr(routers, name)
    raise AttributeError(f"module 'sffn_lab.variants' has no attribute '{name}'")


__all__ = ["Cost", "Layer", "RouterVariant", "Variant", "bank_kinds", "kinds", "register", "variant", *_ROUTER_NAMES]
