"""What training one configuration needs per device: memory, and the bytes it would send between devices.

Memory per device, for one optimizer step of ``data.batch_size / (train.devices · train.num_nodes)``
windows:

- model state: 16 bytes per parameter (fp32 weight, fp32 gradient, AdamW's two fp32 moments; mixed
  precision keeps fp32 weights and casts them per step);
- activations: the bytes autograd saves for backward, *measured* by running the toolkit's own model on this
  machine's CPU, with attention keeping what a CUDA fused kernel keeps (q, k, v, output, log-sum-exp and a
  bias, not the CPU math path's fp32 probabilities: ``_FusedAttentionSaves``)
  (``saved_memory.saved_tensor_bytes``; autocast to the config's precision; training mode, so dropout masks
  count; a model with memory with its cache full) at a few small depths and batch sizes, and extrapolated
  linearly to the config's layers and batch; a plain RoPE Transformer is measured on short windows and
  extrapolated to its window too (its attention runs a fused kernel that saves no S × S matrix, checked by a
  test), every other model (sMLP, relative attention, memory) at its window;
- fixed: the saved bytes that do not grow with the batch (measured as such): the low-precision copies of
  the weights that autocast keeps alive through a step, and the position tables.

Communication per device and step, upper bounds for the two ways of spreading a run over devices:

- data parallel: a ring all-reduce of the fp32 gradients sends 2·(n−1)/n × 4 bytes per parameter; the
  bound for many devices, 8 bytes per parameter, is reported;
- expert parallel (expert-bank layers only): every token's d_model vector goes to its K experts and
  their outputs come back, forward and backward, 4·K·d_model values per token and layer in the activation
  dtype; with the experts spread evenly over E devices and routing balanced, (E−1)/E of it leaves the
  device; the bound (all of it) is reported.

The measurement runs the CPU (torch) path of the sparse layers; the GPU's Triton path saves the same
inputs and outputs of each expert product, and no more.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sffn_lab.config import Config, ModelConfig
from sffn_lab.variants import variant

STATE_BYTES_PER_PARAM = 16
ALLREDUCE_BYTES_PER_PARAM = 8
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TRUE_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16}
MEASURED_WINDOW = 64  # tokens per measured window (the Transformer's saved bytes are linear in the window)


@dataclass(frozen=True)
class TrainingMemory:
    """Per device and optimizer step, in bytes (parameters: a count)."""

    params: int
    tokens: int  # per device and step
    state_bytes: int
    activation_bytes: int
    fixed_bytes: int
    allreduce_bytes: int
    all_to_all_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes + self.fixed_bytes


@dataclass(frozen=True)
class SavedBytes:
    """Activation bytes of one model: ``per_token`` grows with the tokens of a step, ``constant`` does not."""

    per_token: float
    constant: float


def training_memory(config: Config, vocab_size: int) -> TrainingMemory:
    """Memory and communication of one device training ``config`` (see the module docstring)."""
    from sffn_lab.analysis.model_cost import count_model

    model_cfg, seq_len = config.model, config.data.seq_len
    params = count_model(model_cfg, vocab_size, seq_len).total_params
    world = config.train.devices * config.train.num_nodes
    tokens = config.data.batch_size * seq_len // world
    saved = saved_bytes(config, vocab_size)
    activation_size = _activation_dtype(config.train.precision).itemsize
    return TrainingMemory(
        params=params,
        tokens=tokens,
        state_bytes=STATE_BYTES_PER_PARAM * params,
        activation_bytes=round(saved.per_token * tokens),
        fixed_bytes=round(saved.constant),
        allreduce_bytes=ALLREDUCE_BYTES_PER_PARAM * params,
        all_to_all_bytes=4 * _experts_per_token(model_cfg) * model_cfg.d_model * activation_size * tokens
        * _expert_layers(model_cfg),
    )


def saved_bytes(config: Config, vocab_size: int) -> SavedBytes:
    """Measured activation bytes of ``config``'s model, extrapolated from a few small depths and batches.

    Each depth is measured at batch 2 and 3 (the difference grows with tokens, the rest does not; batch 1
    takes other code paths in places, e.g. views instead of copies); the depths separate each kind of layer
    from the embedding, output layer and loss.
    """
    depths = _measured_depths(config.model)
    m = config.model
    # sMLP's token mixing, relative scores [S, M + S] and a memory's attention mask grow faster than the window
    short = m.backbone == "transformer" and m.positions != "relative" and not m.memory_segments
    window = min(config.data.seq_len, MEASURED_WINDOW) if short else config.data.seq_len
    per_seq, constant = {}, {}
    for depth, model_cfg in depths.items():
        two, three = _measure(model_cfg, config.train.precision, vocab_size, config.data.seq_len, window, (2, 3))
        per_seq[depth], constant[depth] = three - two, 3 * two - 2 * three
    target = _depth(config.model)
    base = min(depths)  # every other measured depth adds one layer of one kind to it
    per_token = per_seq[base] / window
    fixed = constant[base]
    for depth in depths:
        if depth == base:
            continue
        kind = next(i for i, (a, b) in enumerate(zip(depth, base, strict=True)) if a != b)
        extra = target[kind] - base[kind]
        per_token += extra * (per_seq[depth] - per_seq[base]) / window
        fixed += extra * (constant[depth] - constant[base])
    return SavedBytes(per_token, fixed)


def _depth(cfg: ModelConfig) -> tuple[int, ...]:
    """Layers of each kind: (n_layers,) for the Transformer, (dense blocks, sparse blocks) for sMLP."""
    if cfg.backbone == "smlp":
        return cfg.smlp.n_dense_blocks, cfg.smlp.n_sparse_blocks
    return (cfg.n_layers,)


def _with_depth(cfg: ModelConfig, depth: tuple[int, ...]) -> ModelConfig:
    if cfg.backbone == "smlp":
        smlp = dataclasses.replace(cfg.smlp, n_dense_blocks=depth[0], n_sparse_blocks=depth[1])
        return dataclasses.replace(cfg, smlp=smlp)
    return dataclasses.replace(cfg, n_layers=depth[0])


def _measured_depths(cfg: ModelConfig) -> dict[tuple[int, ...], ModelConfig]:
    """One layer of each kind, and one more of each kind in turn."""
    base = tuple(1 for _ in _depth(cfg))
    depths = [base] + [tuple(n + (i == kind) for i, n in enumerate(base)) for kind in range(len(base))]
    return {depth: _with_depth(cfg, depth) for depth in depths}


def _measure(cfg: ModelConfig, precision: str, vocab_size: int, max_seq_len: int, window: int,
             batches: tuple[int, ...]) -> list[int]:
    """Saved bytes of one training forward (model and loss) on each number of random windows of ``window``
    tokens in ``batches``, one model built for all."""
    from sffn_lab.analysis.saved_memory import saved_tensor_bytes
    from sffn_lab.lm_module import token_losses
    from sffn_lab.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg, vocab_size, max_seq_len).train()
    if precision in TRUE_DTYPES:
        model = model.to(TRUE_DTYPES[precision])

    autocast = {"dtype": AUTOCAST.get(precision, torch.bfloat16), "enabled": precision in AUTOCAST}

    def step(tokens: torch.Tensor) -> torch.Tensor:
        memory = None
        if cfg.memory_segments:  # the cache a segment of a stream starts with: the previous segments' states
            with torch.no_grad(), torch.autocast("cpu", **autocast):
                for _ in range(cfg.memory_segments):
                    memory = model(tokens[:, :-1], memory).memory
        with torch.autocast("cpu", **autocast):
            out = model(tokens[:, :-1], memory) if cfg.memory_segments else model(tokens[:, :-1])
        losses, _ = token_losses(out.logits, tokens[:, 1:], None)
        return losses.mean()

    with _fused_attention():
        return [saved_tensor_bytes(lambda n=batch: step(torch.randint(0, vocab_size, (n, window + 1))),
                                   model.parameters()) for batch in batches]


class _FusedAttentionSaves(torch.autograd.Function):
    """Scaled dot-product attention that keeps for backward what CUDA's fused kernels keep: q, k, v, the
    output, the log-sum-exp [B, H, S] in fp32, and a float mask (the relative positions' bias). The CPU's
    own kernel with a float mask is the math path, which also keeps the fp32 probabilities [B, H, S, L];
    measuring with this stand-in counts a GPU run's memory. Forward only (a measurement never backpropagates)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, dropout_p, is_causal, sdpa):
        with torch.no_grad():
            out = sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        bias = attn_mask if attn_mask is not None and attn_mask.is_floating_point() else None
        ctx.save_for_backward(q, k, v, out, lse, bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("a stand-in for measuring saved bytes only")


@contextmanager
def _fused_attention():
    """``F.scaled_dot_product_attention`` as a CUDA fused kernel keeps its tensors (autocast: in its dtype)."""
    sdpa = F.scaled_dot_product_attention

    def standin(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
        if torch.is_autocast_enabled("cpu"):  # CUDA's autocast runs attention in the low-precision dtype
            dtype = torch.get_autocast_dtype("cpu")
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return _FusedAttentionSaves.apply(q, k, v, attn_mask, dropout_p, is_causal, sdpa)

    F.scaled_dot_product_attention = standin
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def _activation_dtype(precision: str) -> torch.dtype:
    return AUTOCAST.get(precision) or TRUE_DTYPES.get(precision) or torch.float32


def _experts_per_token(cfg: ModelConfig) -> int:
    """K, as the accounting counts it (0: no expert bank to spread over devices)."""
    return cfg.ffn.top_k if variant(cfg.ffn.kind).uses_bank else 0


def _expert_layers(cfg: ModelConfig) -> int:
    return cfg.smlp.n_sparse_blocks if cfg.backbone == "smlp" else cfg.n_layers
