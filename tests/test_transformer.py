"""The Transformer backbone: shapes, causality, and RoPE against a float64 reference."""

import math

import pytest
import torch

from sffn_lab.config import load_config
from sffn_lab.models import build_model
from sffn_lab.models.transformer import apply_rope, rope_tables
from tests.causality import assert_causal


def small_model(*overrides):
    cfg = load_config(
        None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.ffn.d_ff=64", *overrides]
    )
    return build_model(cfg.model, vocab_size=50, max_seq_len=24).eval()


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_changing_token_t_never_changes_earlier_outputs(positions, seed):
    model = small_model(f"model.positions={positions}")
    assert_causal(model, torch.randint(0, 50, (3, 24)), int(torch.randint(1, 24, ())), vocab_size=50)


def test_rope_matches_float64_rotation(seed):
    S, Dh = 7, 8
    x = torch.randn(2, 3, S, Dh)
    cos, sin = rope_tables(S, Dh)
    got = apply_rope(x, cos, sin)
    ref = torch.empty(2, 3, S, Dh, dtype=torch.float64)
    x64 = x.double()
    for pos in range(S):
        for i in range(Dh // 2):
            theta = pos / 10000 ** (2 * i / Dh)
            c, s = math.cos(theta), math.sin(theta)
            ref[..., pos, 2 * i] = x64[..., pos, 2 * i] * c - x64[..., pos, 2 * i + 1] * s
            ref[..., pos, 2 * i + 1] = x64[..., pos, 2 * i] * s + x64[..., pos, 2 * i + 1] * c
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_too_long_input_is_rejected():
    model = small_model()
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 25, dtype=torch.long))
