"""Typed experiment configuration: dataclasses, YAML files and ``--set key=value`` overrides.

A config is a tree of dataclasses (``Config`` at the root). ``load_config`` reads a YAML file,
applies dotted overrides and checks every key and type: an unknown key fails with the closest
valid key suggested, a value of the wrong type fails with the expected type named. Both raise
``UserError`` so that the CLI can print them without a traceback.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sffn_lab.errors import UserError, did_you_mean

ACTIVATION_NAMES = ("relu", "gelu")  # the keys of layers.dense.ACTIVATIONS
BACKBONES = ("transformer", "smlp")
POSITIONS = ("rope", "learned", "relative")
SMLP_ROUTINGS = ("deterministic", "partial_prediction")
SMLP_MIXINGS = ("toeplitz", "full")
TOKENIZER_KINDS = ("byte", "word", "sentencepiece", "bpe", "gpt2")
MAX_SEED = 2**32 - 1  # seeds are NumPy's (through Lightning's seed_everything): 0 … 2³² − 1
TRAINED_TOKENIZERS = ("sentencepiece", "bpe")  # trained on the training split: <kind>:<vocabulary size>

# ----------------------------------------------------------------------------------------------
# Feed-forward layer (the part every S-FFN variant configures)
# ----------------------------------------------------------------------------------------------


# The FFN variants: kind → its registered class. config.py lists none: ``sffn_lab.variants.register`` fills
# this table (the package registers the built-ins on import), and config.py reads only what a section needs:
# a variant's ``Options`` dataclass (the section ``model.ffn.<kind>``, or None) and ``check(model)``.
VARIANTS: dict[str, Any] = {}
# Called with a config's ``plugins`` value before its keys are read, so that a plugin's variant section is a
# key (``sffn_lab.variants`` adds its loader).
PLUGIN_LOADERS: list[Callable[[str], None]] = []


@dataclass
class FFNConfig:
    """Sizes shared by all variants, plus each variant's options in its own section ``model.ffn.<kind>``.

    ``d_ff`` is the dense width (number of memory cells); block-sparse variants use
    ``n_experts`` blocks of ``expert_size`` cells and select ``top_k`` blocks per token. The sections live
    in ``options`` (kind → that variant's ``Options``), given and read by the kind's name:
    ``FFNConfig(kind="pkm", pkm=PKMOptions(heads=2)).pkm.heads``.
    """

    kind: str = "dense"  # the FFN variant: a built-in or a plugin's (sffn variants lists them)
    d_ff: int = 512  # dense width: the number of memory cells (topk keeps top_k of them)
    activation: str = "relu"  # "relu" or "gelu"
    n_experts: int = 8  # N_E
    expert_size: int = 64  # G (cells per block)
    top_k: int = 2  # K (blocks per token; for kind=topk: cells per token)
    dropout: float = 0.0  # dropout on the FFN's hidden units (dense, Top-K, experts) or PKM's read weights
    options: dict[str, Any] = field(default_factory=dict, metadata={"sections": True})

    def __post_init__(self) -> None:
        for name, cls in VARIANTS.items():
            if cls.Options is not None and name not in self.options:
                self.options[name] = cls.Options()

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"FFNConfig has no field or variant section '{name}'")


def _init_taking_sections(init):
    """``FFNConfig(kind="pkm", pkm=PKMOptions(...))`` and ``dataclasses.replace(cfg, pkm=...)``: keywords named
    after a registered kind set that variant's section in ``options``."""

    def __init__(self, *args, options: dict[str, Any] | None = None, **values: Any) -> None:
        sections = {name: values.pop(name) for name in list(values) if name in VARIANTS}
        init(self, *args, options={**(options or {}), **sections}, **values)

    return __init__


FFNConfig.__init__ = _init_taking_sections(FFNConfig.__init__)  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------
# Model, data, training
# ----------------------------------------------------------------------------------------------


@dataclass
class SMLPConfig:
    """Options of the attention-free sMLP backbone (used when model.backbone=smlp)."""

    n_dense_blocks: int = 2  # N1 gMLP blocks
    n_sparse_blocks: int = 2  # N2 sparse blocks (sMoE + tMoE)
    n_chunks: int = 4  # sMoE experts: the hidden dimension is split into this many chunks
    routing: str = "deterministic"  # "deterministic" or "partial_prediction" (its details assumed: see models/smlp.py)
    prediction_fraction: float = 0.2  # partial prediction: the router sees this leading fraction
    d_hidden: int = 512  # F: the gMLP hidden width (the gate u and the mixed v each have F channels)
    mixing: str = "toeplitz"  # token-mixing weights: "toeplitz" (one per offset t − s) or "full" (L × L)


@dataclass
class ModelConfig:
    backbone: str = "transformer"  # "transformer" or "smlp"
    d_model: int = 128  # residual stream width D
    n_layers: int = 4  # Transformer blocks
    n_heads: int = 4  # attention heads
    head_dim: int = 0  # size of each head's query/key/value; 0: d_model / n_heads (then d_model must divide)
    positions: str = "rope"  # "rope", "learned" or "relative" (Transformer-XL: sinusoidal offsets, two learned biases)
    memory_segments: int = 0  # Transformer-XL memory: attend to the cached states of this many previous segments
    init: str = "default"  # "default" (each module's own) or "paper" (N(0, 2/(n_layers·fan_in)) on every linear)
    dropout: float = 0.0  # dropout on the embeddings and on every residual branch (attention, FFN)
    attention_dropout: float = 0.0  # dropout on the attention probabilities (the σ-MoE paper: 0)
    tie_embeddings: bool = True  # output projection shares the input embedding
    ffn: FFNConfig = field(default_factory=FFNConfig)
    smlp: SMLPConfig = field(default_factory=SMLPConfig)


@dataclass
class SyntheticConfig:
    """The embedded synthetic corpus: documents drawn from several latent Markov sources."""

    seed: int = 0  # seed of the generated corpus
    n_sources: int = 4  # latent Markov sources documents are drawn from
    vocab_size: int = 32  # symbols of the corpus
    order: int = 2  # Markov order of each source
    doc_length: int = 512  # tokens per document
    train_tokens: int = 2_000_000  # tokens of the training split
    valid_tokens: int = 100_000  # tokens of the validation split
    test_tokens: int = 100_000  # tokens of the test split


@dataclass
class DataConfig:
    corpus: str = "synthetic"  # a registered corpus name, a path to a local text file, or hf:NAME[:CONFIG] (datasets)
    text_column: str = "text"  # the column of an hf: dataset that holds the text
    seq_len: int = 128  # tokens per training window
    batch_size: int = 32  # windows per training batch: the global batch, split over the processes
    eval_batch_size: int = 64  # windows per evaluation batch
    cache_dir: str = ""  # empty: $SFFN_DATA or the user's cache directory
    tokenizer: str = ""  # empty: the corpus' own unit; byte, word, sentencepiece:<vocab>, bpe:<vocab> or gpt2
    num_workers: int = 0  # DataLoader worker processes
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup steps before the cosine decay
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not on embeddings, norms, biases)
    beta1: float = 0.9  # AdamW β1
    beta2: float = 0.95  # AdamW β2
    grad_clip: float = 1.0  # gradient-norm clipping (0: none)
    val_every: int = 250  # steps between validations (each also saves the best checkpoint)
    checkpoint_every: int = 0  # steps between saves of last.ckpt; 0: at every validation
    val_batches: int = 0  # 0: the whole validation split; N: its first N batches (fast curves)
    log_every: int = 10  # steps between logged training rows (and plain progress lines)
    seed: int = 0  # seed of init, data order and dropout
    accelerator: str = "auto"  # Lightning accelerator: auto, cpu, gpu …
    devices: int = 1  # devices per node (processes under ddp)
    num_nodes: int = 1  # machines, each running train.devices processes (launched by SLURM, torchrun or by hand)
    strategy: str = "auto"  # Lightning strategy: auto, ddp, fsdp …
    precision: str = "32-true"  # 32-true, bf16-mixed, bf16-true, 16-mixed (GPU) …
    matmul_precision: str = "highest"  # fp32 products: highest (IEEE), high (TF32 on GPUs), medium (bf16 passes)
    compile: bool = False  # torch.compile the model (the expert products are custom ops: no graph breaks)
    accumulate_grad_batches: int = 1  # batches whose gradients add up to one optimizer step
    loggers: str = "csv,tensorboard"  # comma-separated: csv (always), tensorboard, wandb, mlflow
    skip_nonfinite: bool = False  # skip a batch whose loss is NaN/inf instead of stopping
    deterministic: bool = False  # torch deterministic algorithms (CPU runs are reproducible without it)
    out_dir: str = "runs"  # directory that holds the run directories


@dataclass
class EvalConfig:
    stride: int = 0  # models without memory: sliding windows that score their last `stride` tokens (0: seq_len)


@dataclass
class Config:
    name: str = "default"  # run name: the prefix of the run directory
    plugins: str = ""  # FFN variants from outside: files or modules, comma-separated (sffn train --plugin)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
# Loading, overriding, saving
# ----------------------------------------------------------------------------------------------


def field_types(cls: type) -> dict[str, Any]:
    """Every key of section ``cls`` → its type: its fields, and for ``FFNConfig`` each variant's options section."""
    hints = typing.get_type_hints(cls)
    types_ = {f.name: hints[f.name] for f in dataclasses.fields(cls) if not f.metadata.get("sections")}
    if _sections_field(cls):
        types_.update({name: v.Options for name, v in VARIANTS.items() if v.Options is not None})
    return types_


def _sections_field(cls: type) -> str | None:
    """The field of ``cls`` that holds the variant sections (``FFNConfig.options``), if it has one."""
    return next((f.name for f in dataclasses.fields(cls) if f.metadata.get("sections")), None)


def _suggest(key: str, options: list[str]) -> str:
    return did_you_mean(key, options, cutoff=0.5) or f" Valid keys: {', '.join(sorted(options))}."


def _coerce(value: Any, expected: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``expected``; ints are accepted for floats."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _coerce(value, option, where)
            except UserError:
                continue
        raise UserError(f"Config key '{where}' got {value!r}, which is not a valid {expected}.")
    if expected is type(None):
        if value is None:
            return None
    elif expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"unsupported config annotation {expected}")
    name = getattr(expected, "__name__", str(expected))
    raise UserError(f"Config key '{where}' expects a {name}, got {value!r} ({type(value).__name__}).")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"Config section '{prefix or '<root>'}' must be a mapping, got {data!r}.")
    if cls is Config:
        load_plugins(data.get("plugins") or "")
    types_ = field_types(cls)
    sections = _sections_field(cls)
    kwargs: dict[str, Any] = {sections: {}} if sections else {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in types_:
            plugin = sections and isinstance(value, dict)
            hint = " (a plugin's variant section? load the plugin with --plugin)" if plugin else ""
            raise UserError(f"Unknown config key '{where}'{hint}.{_suggest(str(key), list(types_))}")
        expected = types_[key]
        if dataclasses.is_dataclass(expected):
            target = kwargs[sections] if sections and key in VARIANTS else kwargs  # a variant's options section
            target[key] = from_dict(expected, value or {}, prefix=f"{where}.")
        else:
            kwargs[key] = _coerce(value, expected, where)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as nested plain data, each variant's options as its section (``model.ffn.sigma_moe: {...}``)."""
    data = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("sections"):
            data.update({name: to_dict(options) for name, options in value.items()})
        else:
            data[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return data


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class, e.g. ``model.ffn.top_k``."""
    keys = []
    for name, expected in field_types(cls).items():
        if dataclasses.is_dataclass(expected):
            keys += all_keys(expected, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.d_model=256"`` → (["model", "d_model"], 256). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise UserError(f"Override '{text}' is not of the form key=value (e.g. model.d_model=256).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"Override '{text}' has an empty key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UserError(f"Override '{text}': the value is not valid YAML ({exc}).") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict, validating each key path against ``Config``."""
    parsed = [parse_override(text) for text in overrides]
    for path, value in parsed:
        if path == ["plugins"]:
            data["plugins"] = value
    load_plugins(data.get("plugins") or "")
    valid = all_keys()
    for path, value in parsed:
        dotted = ".".join(path)
        if dotted not in valid:
            raise UserError(f"Unknown config key '{dotted}'.{_suggest(dotted, valid)}")
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"Config key '{dotted}': '{part}' is not a section in the config file.")
        node[path[-1]] = value
    return data


def load_plugins(spec: str) -> None:
    """Load the plugins a ``plugins`` value names (their variants become kinds and sections)."""
    for loader in PLUGIN_LOADERS:
        loader(str(spec))


def read_yaml(path: str | Path, what: str = "Config file") -> dict[str, Any]:
    """The mapping in a YAML file; ``what`` names the file in the errors ("Config file", "Grid file")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{what} '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} '{path}' must hold a mapping at the top level.")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, check: bool = True) -> Config:
    """Read a YAML config (or the defaults), apply overrides, validate and return a ``Config``.

    ``check=False`` leaves the cross-field checks to the caller (a grid validates after deriving sizes).
    """
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    config = from_dict(Config, data)
    if check:
        validate(config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's


def choice(value: str, options: tuple[str, ...], key: str) -> None:
    """Refuse a value that is not one of ``options``, suggesting the closest."""
    if value not in options:
        raise UserError(f"Unknown {key} '{value}'.{did_you_mean(value, options)} Choose one of: {', '.join(options)}.")


def validate(config: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    m, d, t = config.model, config.data, config.train
    choice(m.backbone, BACKBONES, "model.backbone")
    choice(m.positions, POSITIONS, "model.positions")
    choice(m.init, ("default", "paper"), "model.init")
    choice(t.matmul_precision, MATMUL_PRECISIONS, "train.matmul_precision")
    if m.d_model <= 0 or m.n_layers <= 0 or m.n_heads <= 0:
        raise UserError("model.d_model, model.n_layers and model.n_heads must be positive.")
    if m.backbone == "transformer" and not m.head_dim and m.d_model % m.n_heads:
        raise UserError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}), "
                        "or set model.head_dim.")
    if m.head_dim < 0:
        raise UserError("model.head_dim must be ≥ 0 (0: d_model / n_heads).")
    if m.backbone == "transformer" and m.positions == "rope" and attention_head_dim(m) % 2:
        raise UserError(f"RoPE needs an even head dimension, got {attention_head_dim(m)} (model.head_dim, or "
                        "model.d_model / model.n_heads).")
    if d.seq_len < 2 or d.batch_size < 1 or d.eval_batch_size < 1:
        raise UserError("data.seq_len must be at least 2 and the batch sizes at least 1.")
    parse_tokenizer(d.tokenizer)
    if m.memory_segments < 0:
        raise UserError("model.memory_segments must be ≥ 0 (0: no memory).")
    if m.memory_segments and (m.backbone != "transformer" or m.positions == "learned"):
        raise UserError("model.memory_segments needs the Transformer with model.positions=relative (or rope): "
                        "absolute learned positions and sMLP's fixed-length token mixing cannot reach a cache.")
    if not 0 <= config.eval.stride <= d.seq_len:
        raise UserError(f"eval.stride must be between 0 and data.seq_len ({d.seq_len}); 0 scores whole windows.")
    if config.eval.stride and m.memory_segments:
        raise UserError("eval.stride is for models without memory; a model with model.memory_segments evaluates "
                        "each split in order, carrying its cache, every token scored once with its memory.")
    if t.max_steps < 1 or t.lr <= 0 or t.warmup_steps < 0 or t.val_every < 1:
        raise UserError("train.max_steps and train.val_every must be ≥ 1, train.lr > 0, warmup ≥ 0.")
    if t.accumulate_grad_batches < 1:
        raise UserError("train.accumulate_grad_batches must be at least 1.")
    if t.num_nodes < 1:
        raise UserError("train.num_nodes must be at least 1.")
    if not 0 <= t.seed <= MAX_SEED:
        raise UserError(f"train.seed must be between 0 and {MAX_SEED}, got {t.seed}.")
    validate_ffn(m)
    if m.backbone == "smlp":
        validate_smlp(m.smlp)


def validate_ffn(m: ModelConfig) -> None:
    """Reject impossible FFN settings with a message that says what to change: the shared sizes here, the
    variant's own options by its ``check``."""
    cfg = m.ffn
    choice(cfg.kind, tuple(VARIANTS), "model.ffn.kind")
    choice(cfg.activation, ACTIVATION_NAMES, "model.ffn.activation")
    if cfg.d_ff < 1 or not 0 <= cfg.dropout < 1:
        raise UserError("model.ffn.d_ff must be positive and model.ffn.dropout in [0, 1).")
    VARIANTS[cfg.kind].check(m)


def parse_tokenizer(spec: str) -> tuple[str, int]:
    """``data.tokenizer`` → (kind, vocabulary size): "bpe:8000" → ("bpe", 8000), "gpt2" → ("gpt2", 0), "" → ("", 0)."""
    kind, _, size = spec.partition(":")
    if not spec:
        return "", 0
    if kind not in TOKENIZER_KINDS:
        raise UserError(f"Unknown data.tokenizer '{spec}'.{did_you_mean(kind, TOKENIZER_KINDS)} Choose one of: byte, "
                        "word, sentencepiece:<vocab size>, bpe:<vocab size>, gpt2 (or empty: the corpus' own unit).")
    if kind not in TRAINED_TOKENIZERS:
        if size:
            raise UserError(f"data.tokenizer={kind} takes no vocabulary size (got '{spec}').")
        return kind, 0
    if not size.isdigit() or int(size) <= 256:
        raise UserError(f"data.tokenizer={spec}: the vocabulary size must be an integer above 256 (both trained "
                        f"tokenizers start from the 256 bytes), e.g. {kind}:8000.")
    return kind, int(size)


def attention_head_dim(m: ModelConfig) -> int:
    """Each attention head's size: model.head_dim, or d_model / n_heads when it is 0."""
    return m.head_dim or m.d_model // m.n_heads


def validate_smlp(s: SMLPConfig) -> None:
    """Reject sMLP options that cannot work."""
    choice(s.routing, SMLP_ROUTINGS, "model.smlp.routing")
    choice(s.mixing, SMLP_MIXINGS, "model.smlp.mixing")
    if s.n_dense_blocks < 0 or s.n_sparse_blocks < 0 or s.n_dense_blocks + s.n_sparse_blocks == 0:
        raise UserError("model.smlp needs at least one block (n_dense_blocks + n_sparse_blocks ≥ 1).")
    if s.d_hidden < 1 or s.n_chunks < 1 or s.d_hidden % s.n_chunks:
        raise UserError(f"model.smlp.n_chunks ({s.n_chunks}) must divide model.smlp.d_hidden ({s.d_hidden}).")
    if not 0 < s.prediction_fraction < 1:
        raise UserError("model.smlp.prediction_fraction must be between 0 and 1.")
