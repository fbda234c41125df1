"""Property tests (Hypothesis): config overrides fail only cleanly; block-sparse layers are well-formed."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sffn_lab.config import Config, FFNConfig, all_keys, load_config
from sffn_lab.errors import UserError
from sffn_lab.layers.moe import MoEFFN
from sffn_lab.variants import bank_kinds
from sffn_lab.variants.sigma_moe import SigmaMoEOptions
from sffn_lab.variants.switch import SwitchOptions

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = all_keys(Config)


@st.composite
def override_keys(draw) -> str:
    """A real key, or one mutated the way people mistype keys (typos, wrong section, missing part)."""
    key = draw(st.sampled_from(KEYS))
    mutation = draw(st.sampled_from(["none", "drop", "insert", "section", "prefix", "suffix", "junk"]))
    if mutation == "none":
        return key
    i = draw(st.integers(0, len(key) - 1))
    if mutation == "drop":
        return key[:i] + key[i + 1 :]
    if mutation == "insert":
        return key[:i] + draw(st.sampled_from(list("._=x "))) + key[i:]
    if mutation == "section":
        return key.rsplit(".", 1)[0]  # a section, not a leaf
    if mutation == "prefix":
        return draw(st.sampled_from(["model.", "train.", "data.", "."])) + key
    if mutation == "suffix":
        return key + draw(st.sampled_from([".x", ".", "s", "_"]))
    return draw(st.text(max_size=20))


YAML_SCALARS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "False", "null", "~", ".nan", "-.inf", "1e-3", "0x1f", "[1, 2]", "{a: 1}", "''",
                     "[", "{", ": x", "!!python/object:os.system", "- a", "&a b", "*a", "%TAG", "\t",
                     "sigma_moe", "dense", "smlp", "rope", "32-true", "ddp", "fsdp", "cpu"]),
    st.text(max_size=30),
)


@FAST
@given(st.lists(st.tuples(override_keys(), YAML_SCALARS, st.booleans()), min_size=1, max_size=3))
def test_any_override_gives_a_valid_config_or_a_user_error(overrides):
    """``key=value`` strings (sometimes without '='): load_config returns a Config or raises a UserError."""
    texts = [f"{key}={value}" if with_equals else f"{key}{value}" for key, value, with_equals in overrides]
    try:
        config = load_config(None, texts)
    except UserError as exc:
        assert str(exc)
        return
    assert isinstance(config, Config)


@st.composite
def block_layers(draw) -> tuple[FFNConfig, int, int, int]:
    """A valid block-sparse FFN config for each router kind, with a batch shape (B, S) and width D."""
    kind = draw(st.sampled_from(bank_kinds()))
    n_experts = draw(st.integers(1, 9))
    top_k = draw(st.integers(1, n_experts))
    cfg = FFNConfig(kind=kind, n_experts=n_experts, top_k=top_k, expert_size=draw(st.integers(1, 6)),
                    activation=draw(st.sampled_from(["relu", "gelu"])))
    if kind == "sigma_moe":
        dropout = draw(st.sampled_from([0.0, 0.5])) if n_experts > top_k else 0.0
        cfg = dataclasses.replace(cfg, sigma_moe=SigmaMoEOptions(
            expert_dropout=dropout, gate=draw(st.sampled_from(["sigmoid", "softmax", "none"])),
            renormalize=draw(st.booleans())))
    if kind == "switch":
        capacity = draw(st.sampled_from([0.0, 0.5, 1.0]))
        cfg = dataclasses.replace(cfg, switch=SwitchOptions(capacity_factor=capacity))
    return cfg, draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.sampled_from([4, 8]))


@FAST
@given(block_layers(), st.booleans(), st.integers(0, 2**31 - 1))
def test_every_block_layer_gives_finite_outputs_and_t_times_k_assignments(layer_and_shape, training, seed):
    cfg, B, S, D = layer_and_shape
    torch.manual_seed(seed)
    layer = MoEFFN(cfg, D, n_layers=2, vocab_size=1000).train(training)
    x = torch.randn(B, S, D)
    token_ids = torch.randint(0, 1000, (B, S))
    T, K = B * S, cfg.top_k

    routing = layer.router(x.reshape(T, D), token_ids, layer.bank)
    assert routing.indices.shape == (T, K) and routing.indices.dtype == torch.long
    assert ((routing.indices >= 0) & (routing.indices < cfg.n_experts)).all()
    assert all(len(set(row)) == K for row in routing.indices.tolist()), "a token picked one expert twice"
    if routing.gates is not None:
        assert routing.gates.shape == (T, K) and torch.isfinite(routing.gates).all()
    if routing.aux_loss is not None:
        assert routing.aux_loss.dim() == 0 and torch.isfinite(routing.aux_loss)

    out = layer(x, token_ids)
    assert out.y.shape == (B, S, D) and torch.isfinite(out.y).all()
    assert out.expert_counts.shape == (cfg.n_experts,)
    assert int(out.expert_counts.sum()) == T * K
    if training and out.aux_loss is not None:
        out.aux_loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters())
