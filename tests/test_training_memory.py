"""`sffn variants --memory`: the extrapolated activation bytes equal a direct measurement of the full model,
the Transformer's saved bytes are linear in the window, and the state and communication bounds by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sffn_lab.analysis import training_memory as tm
from sffn_lab.config import load_config
from tests.support import TINY, run_cli

MOE = ["model.ffn.kind=sigma_moe", "model.ffn.n_experts=4", "model.ffn.expert_size=16", "model.ffn.top_k=2"]
DENSE = ["model.ffn.kind=dense"]
XL = [*MOE, "model.positions=relative", "model.memory_segments=2"]
SMLP = ["model.backbone=smlp", "model.ffn.kind=base", "model.ffn.n_experts=4", "model.ffn.expert_size=16",
        "model.ffn.top_k=1", "model.smlp.n_dense_blocks=2", "model.smlp.n_sparse_blocks=2"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("variant", [DENSE, MOE, SMLP, XL], ids=["dense", "sigma_moe", "smlp", "xl"])
def test_extrapolated_activation_bytes_equal_the_full_model_measured(variant, precision):
    config = load_config(None, [*TINY, *variant, "model.n_layers=3", "data.batch_size=5",
                                f"train.precision={precision}"])
    m = tm.training_memory(config, 64)
    window = config.data.seq_len
    [direct] = tm._measure(config.model, precision, 64, config.data.seq_len, window, (config.data.batch_size,))
    assert m.activation_bytes + m.fixed_bytes == pytest.approx(direct, rel=1e-3)
    rope = variant is not XL and variant is not SMLP
    if precision == "32-true" and rope:  # the RoPE Transformer's fixed part in fp32: its position tables only
        assert m.fixed_bytes < 0.01 * direct
    if precision == "bf16-mixed" and variant is not XL:  # a bf16 copy of (almost) every weight through the step
        fp32 = tm.training_memory(dataclasses.replace(config, train=dataclasses.replace(
            config.train, precision="32-true")), 64)
        assert 1.8 * m.params <= m.fixed_bytes - fp32.fixed_bytes <= 2 * m.params


def test_the_transformers_saved_bytes_grow_linearly_with_the_window():
    config = load_config(None, [*TINY, *MOE, "data.seq_len=128"])
    [short], [middle], [long] = (tm._measure(config.model, "32-true", 64, 128, window, (1,))
                                 for window in (32, 64, 128))
    per_token_short = middle - short
    assert long - short == pytest.approx(per_token_short * 3, rel=1e-2)


def test_state_and_communication_bounds_by_hand():
    config = load_config(None, [*TINY, *MOE, "model.n_layers=2", "data.batch_size=8", "train.precision=bf16-mixed",
                                "train.devices=2"])
    m = tm.training_memory(config, 64)
    assert m.state_bytes == 16 * m.params and m.allreduce_bytes == 8 * m.params
    tokens = 8 * config.data.seq_len // 2  # per device
    assert m.tokens == tokens
    assert m.all_to_all_bytes == 4 * 2 * 32 * 2 * tokens * 2  # 4·K·d_model·2 bytes·tokens·layers
    dense = dataclasses.replace(config, model=dataclasses.replace(
        config.model, ffn=dataclasses.replace(config.model.ffn, kind="dense")))
    assert tm.training_memory(dense, 64).all_to_all_bytes == 0


def test_memory_tables_of_a_grid(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nset: [" + ", ".join(f'"{o}"' for o in TINY) + "]\nruns:\n"
                    "  - {name: dense, set: [model.ffn.kind=dense]}\n"
                    "  - {name: moe, set: [model.ffn.kind=sigma_moe, model.ffn.expert_size=16]}\n")
    code, out, err = run_cli(["variants", "--memory", "--grid", grid, "--markdown", tmp_path / "m.md"], capsys)
    assert code == 0 and "state GB" in out, err
    table = (tmp_path / "m.md").read_text()
    assert "| dense |" in table and "| moe |" in table and "sffn variants --memory --grid" in table
    code, _, err = run_cli(["variants", "--memory", "--grid", "nonexistent"], capsys)
    assert code != 0 and "not a file nor a shipped experiment" in err


def test_the_attention_stand_in_keeps_what_a_fused_kernel_keeps():
    """Without a mask the CPU runs a fused (flash) kernel: the stand-in that measures every model as a CUDA
    fused kernel would keep its tensors saves exactly as many bytes."""
    from sffn_lab.analysis.saved_memory import saved_tensor_bytes
    from sffn_lab.models import build_model

    def saved(overrides, stand_in):
        model = build_model(load_config(None, [*TINY, "model.dropout=0.0", "model.n_layers=1", *overrides]).model,
                            64, 32)
        tokens = torch.randint(0, 64, (3, 32))
        if stand_in:
            with tm._fused_attention():
                return saved_tensor_bytes(lambda: model(tokens).logits.sum(), model.parameters())
        return saved_tensor_bytes(lambda: model(tokens).logits.sum(), model.parameters())

    assert saved([], stand_in=True) == saved([], stand_in=False)
