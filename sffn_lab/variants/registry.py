"""The table of FFN variants: ``@register("name")`` on a class adds it, ``variant(kind)`` finds it.

The table itself is ``sffn_lab.config.VARIANTS`` (config.py reads it to type each ``model.ffn.<kind>``
section and to validate the chosen kind, without importing any variant). A registered class carries:

- ``name`` (set by ``register``) and ``Options``: its options dataclass, the section ``model.ffn.<name>``
  (the comment beside each field is its ``sffn config keys`` help);
- ``gates``: the choices of ``Options.gate``, when it has one;
- ``uses_bank``: whether it routes tokens to the expert bank (``model.ffn.n_experts``, ``expert_size``);
- ``host_syncs``: why its training step waits for the device, when it does so by design (None: it does not);
- ``check(model)``: refuse impossible settings with a ``UserError`` that says what to change;
- ``build(cfg, d_model, n_layers, vocab_size)``: one FFN layer, x [B, S, D] (token ids [B, S]) → ``FFNOutput``;
- its accounting: ``cost(cfg, d_model)``, measured from the built layer (``sffn_lab.variants.measure``) with
  what the counter cannot see declared in ``inactive_params`` and ``uncounted_flops``; ``sizes(cfg)``,
  ``param_equal(...)``, ``compute_equal(...)``.

``Router`` subclasses (``sffn_lab.layers.routers``) get all but ``Options``, ``forward`` and their init from
the base; whole layers derive from ``Layer`` (``sffn_lab.variants.layer``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from sffn_lab.config import VARIANTS, FFNConfig, ModelConfig, choice
from sffn_lab.errors import UserError, did_you_mean
from sffn_lab.variants.cost import Cost


class Variant:
    """The defaults of every registered variant (see the module docstring); all of it is class-level."""

    name: ClassVar[str] = ""  # set by ``register``
    Options: ClassVar[type | None] = None  # the dataclass of section model.ffn.<name>; None: no options
    gates: ClassVar[tuple[str, ...]] = ()  # the choices of Options.gate
    uses_bank: ClassVar[bool] = False
    host_syncs: ClassVar[str | None] = None  # why a training step waits for the device, if it does by design

    @classmethod
    def check(cls, model: ModelConfig) -> None:
        """Refuse impossible settings of this variant (the shared sizes are checked by config.py)."""
        if cls.gates:
            choice(model.ffn.options[cls.name].gate, cls.gates, f"model.ffn.{cls.name}.gate")

    @classmethod
    def build(cls, cfg: FFNConfig, d_model: int, n_layers: int, vocab_size: int) -> Any:
        """One FFN layer: x [B, S, D] (token ids [B, S]) → ``FFNOutput``."""
        raise NotImplementedError

    @classmethod
    def cost(cls, cfg: FFNConfig, d_model: int) -> Cost:
        """Total and active parameters and forward FLOPs/token of one layer, measured from the built layer
        (``sffn_lab.variants.measure``) with what the two declarations below add."""
        from sffn_lab.variants.measure import measure

        return measure(cls, cfg, d_model)

    @classmethod
    def inactive_params(cls, cfg: FFNConfig, d_model: int, layer: Any) -> int:
        """Parameters of the built ``layer`` that one token does not touch (a data-dependent choice)."""
        return 0

    @classmethod
    def uncounted_flops(cls, cfg: FFNConfig, d_model: int) -> int:
        """Forward FLOPs per token that ``FlopCounterMode`` does not see in this layer's code (negative: what
        the code spends beyond the method's own)."""
        return 0

    @classmethod
    def sizes(cls, cfg: FFNConfig) -> str:
        """The sizes that define a layer, e.g. ``d_ff=2048``."""
        return f"d_ff={cfg.d_ff}"

    @classmethod
    def describe(cls, cfg: FFNConfig) -> str:
        """Its sizes in words, for a model card (e.g. ``d_ff 2048``)."""
        return f"d_ff {cfg.d_ff}"

    @classmethod
    def table_options(cls, expert_size: int, top_k: int) -> dict[str, Any]:
        """The ``model.ffn`` keys of this variant's row in ``sffn variants`` (block size G, K blocks)."""
        return {}

    @classmethod
    def param_equal(cls, cfg: FFNConfig, dense: FFNConfig, d_model: int, options: dict[str, Any]) -> FFNConfig:
        """``cfg`` resized to the dense FFN's total parameters (the sizes in ``options`` kept)."""
        return cfg

    @classmethod
    def compute_equal(cls, cfg: FFNConfig, dense: FFNConfig, d_model: int, options: dict[str, Any]) -> FFNConfig:
        """``cfg`` resized to the dense FFN's forward FLOPs/token (by default: parameter-equal)."""
        return cls.param_equal(cfg, dense, d_model, options)


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make the class the FFN variant ``model.ffn.kind=name`` (fairseq/timm's ``@register``)."""

    def add(cls: type) -> type:
        if name in VARIANTS and VARIANTS[name] is not cls:
            raise UserError(f"Two FFN variants are registered as '{name}' ({VARIANTS[name].__module__} and "
                            f"{cls.__module__}); rename one.")
        if not name.isidentifier():
            raise UserError(f"FFN variant name '{name}' must be a Python identifier (it names a config section).")
        cls.name = name
        VARIANTS[name] = cls
        return cls

    return add


def variant(kind: str) -> Any:
    """The registered class of ``model.ffn.kind=kind``."""
    if kind not in VARIANTS:
        raise UserError(f"Unknown model.ffn.kind '{kind}'.{did_you_mean(kind, list(VARIANTS))} "
                        f"Choose one of: {', '.join(VARIANTS)} (or load yours with --plugin).")
    return VARIANTS[kind]


def kinds() -> tuple[str, ...]:
    """Every registered kind, built-ins first, in registration order."""
    return tuple(VARIANTS)


def bank_kinds() -> tuple[str, ...]:
    """The kinds that route tokens to the expert bank."""
    return tuple(k for k, v in VARIANTS.items() if v.uses_bank)
