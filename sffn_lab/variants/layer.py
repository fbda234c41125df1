"""``Layer``: the base of the variants that are a whole FFN layer of their own (no router, no expert bank)."""

from __future__ import annotations

from sffn_lab.variants.registry import Variant


class Layer(Variant):
    """A registered variant that builds its own layer: override ``build`` and ``cost`` (and ``Options``,
    ``check``, ``sizes``, the sizing rules as needed). The layer's module carries its ``model.init=paper``
    rule as ``paper_init_(scale)`` when it has one beyond ``nn.Linear``'s."""
