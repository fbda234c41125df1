"""Every FFN kind and backbone trains, validates and evaluates in every precision Lightning offers on the CPU,
and every shipped grid's precision runs one step of each of its runs (shrunk) before it can ship."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch

from sffn_lab import training
from sffn_lab.ablation import is_grid, load_grid
from sffn_lab.config import Config, load_config, validate
from sffn_lab.errors import UserError
from sffn_lab.models import build_model
from sffn_lab.variants import kinds

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CPU_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")  # Lightning's 16-mixed needs CUDA
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.ffn.d_ff=64", "model.ffn.n_experts=4",
    "model.ffn.expert_size=16", "model.ffn.top_k=2", "model.ffn.pkm.n_keys=8", "model.ffn.pkm.knn=4",
    "model.ffn.pkm.key_dim=16", "model.ffn.pkm.heads=2", "model.smlp.d_hidden=64", "data.seq_len=32",
    "data.batch_size=8", "data.eval_batch_size=32", "data.synthetic.train_tokens=20000",
    "data.synthetic.valid_tokens=2000", "data.synthetic.test_tokens=2000", "train.max_steps=3",
    "train.val_every=3", "train.log_every=1", "train.warmup_steps=1",
]
# First-step loss in bf16 vs fp32 (nats, same init and batch, loss ≈ 3.47): bf16 rounds activations to
# 8 bits of mantissa and may flip a near-tied routing choice. Measured over all kinds: at most 6e-4
# (bf16-mixed) and 1.1e-3 (bf16-true).
FIRST_LOSS_TOL = {"bf16-mixed": 0.01, "bf16-true": 0.01}


def first_train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]


def train_tiny(kind: str, precision: str, out: Path) -> training.RunSummary:
    backbone = ["model.backbone=smlp", "model.ffn.kind=base", "model.ffn.top_k=1"] if kind == "smlp" else []
    config = load_config(None, [*TINY, f"model.ffn.kind={kind}", *backbone, f"train.precision={precision}",
                                f"train.out_dir={out}", f"name={kind}-{precision}"])
    return training.train(config, progress=False)


@pytest.mark.parametrize("kind", [*kinds(), "smlp"])
def test_every_kind_trains_validates_and_evaluates_in_each_cpu_precision(kind, tmp_path):
    reference = train_tiny(kind, "32-true", tmp_path)
    reference_first = first_train_losses(Path(reference.run_dir))[0]
    for precision in ("bf16-mixed", "bf16-true"):
        summary = train_tiny(kind, precision, tmp_path)
        losses = first_train_losses(Path(summary.run_dir))
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
        assert abs(losses[0] - reference_first) < FIRST_LOSS_TOL[precision], (precision, losses[0], reference_first)
        assert math.isfinite(summary.val_loss)
        scored = training.evaluate(Path(summary.run_dir), "valid")
        assert math.isfinite(scored["loss"]) and abs(scored["loss"] - summary.val_loss) < 0.05


def shrunk(config: Config, out: Path) -> Config:
    """The run at toy sizes on the synthetic corpus, with its kind, options and precision kept."""
    c = copy.deepcopy(config)
    m, f = c.model, c.model.ffn
    m.d_model, m.n_layers, m.n_heads = 32, min(m.n_layers, 2), 2
    f.d_ff, f.expert_size = 64, 8
    if f.kind == "topk":
        f.top_k = min(f.top_k, f.d_ff)
    f.pkm.n_keys, f.pkm.knn, f.pkm.key_dim = 8, min(f.pkm.knn, 8), 16
    m.smlp.d_hidden = 16 * m.smlp.n_chunks
    m.smlp.n_dense_blocks, m.smlp.n_sparse_blocks = min(m.smlp.n_dense_blocks, 1), min(m.smlp.n_sparse_blocks, 1)
    c.data.corpus, c.data.seq_len, c.data.batch_size, c.data.eval_batch_size = "synthetic", 32, 4, 16
    c.data.tokenizer = ""  # the synthetic corpus has its own symbols
    s = c.data.synthetic
    s.train_tokens, s.valid_tokens, s.test_tokens = 5000, 1000, 1000
    t = c.train
    t.max_steps, t.val_every, t.val_batches, t.log_every, t.warmup_steps = 1, 1, 1, 1, 0
    t.accelerator, t.devices, t.strategy, t.out_dir = "cpu", 1, "auto", str(out)
    validate(c)
    return c


SHIPPED = sorted(EXPERIMENTS.rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_shipped_experiment_and_grid_runs_a_step_of_each_run_at_its_precision(path, tmp_path):
    """A grid: one step of each of its runs (first seed); an experiment file: one step of it."""
    if is_grid(path):
        runs = {}
        for run in load_grid(path).runs:
            runs.setdefault(run.name, run.config)
    else:
        runs = {path.stem: load_config(path)}
    precisions = {config.train.precision for config in runs.values()}
    if precisions <= {"32", "32-true"}:
        pytest.skip("full precision only")
    unsupported = precisions - set(CPU_PRECISIONS)
    assert not unsupported, f"{path.name} sets {unsupported}, which this test cannot run on the CPU"
    for name, config in runs.items():
        summary = training.train(shrunk(config, tmp_path / name), progress=False)
        assert summary.step == 1 and math.isfinite(summary.val_loss), name


@pytest.mark.parametrize("kind", [*kinds(), "smlp"])
def test_under_bf16_autocast_fp32_parameters_get_fp32_gradients_and_routing_stays_fp32(kind):
    backbone = ["model.backbone=smlp", "model.ffn.kind=base", "model.ffn.top_k=1"] if kind == "smlp" else []
    config = load_config(None, [*TINY, f"model.ffn.kind={kind}", *backbone])
    model = build_model(config.model, vocab_size=32, max_seq_len=32)
    tokens = torch.randint(0, 32, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens)
    loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), tokens.flatten()) + out.aux_loss
    loss.backward()
    assert out.aux_loss.dtype == torch.float32
    for layer in out.layer_stats:
        for stat in (layer.expert_counts, layer.gate_mean):
            assert stat is None or stat.dtype == torch.float32
    grads = {name: p.grad.dtype for name, p in model.named_parameters() if p.grad is not None}
    assert grads and set(grads.values()) == {torch.float32}, grads


def test_train_matmul_precision_holds_through_training_and_evaluation_and_is_restored(tmp_path, monkeypatch):
    import lightning as L

    from sffn_lab.lm_module import LanguageModelModule

    seen = {"train": set(), "test": set()}

    class Record(L.Callback):
        def on_train_batch_start(self, *args):
            seen["train"].add(torch.get_float32_matmul_precision())

        def on_validation_batch_start(self, *args):
            seen["train"].add(torch.get_float32_matmul_precision())

    def record_test(self, *args):
        seen["test"].add(torch.get_float32_matmul_precision())

    before = torch.get_float32_matmul_precision()
    config = load_config(None, [*TINY, "train.matmul_precision=medium", f"train.out_dir={tmp_path}"])
    summary = training.train(config, progress=False, extra_callbacks=[Record()])
    assert seen["train"] == {"medium"} and torch.get_float32_matmul_precision() == before
    monkeypatch.setattr(LanguageModelModule, "on_test_batch_start", record_test, raising=False)
    training.evaluate(Path(summary.run_dir), "valid", ["train.matmul_precision=high"])
    assert seen["test"] == {"high"} and torch.get_float32_matmul_precision() == before


def test_an_unknown_matmul_precision_is_refused_with_the_choices():
    with pytest.raises(UserError, match=r"train.matmul_precision 'hihg'.*highest, high, medium"):
        load_config(None, ["train.matmul_precision=hihg"])


@pytest.mark.parametrize(("overrides", "capability", "warned"), [
    ([], (9, 0), True),  # an H100 at the defaults: IEEE fp32 products
    (["train.precision=32"], (8, 0), True),  # Lightning's alias of 32-true
    ([], (7, 0), False),  # no TF32 before Ampere
    ([], None, False),  # no GPU
    (["train.matmul_precision=high"], (9, 0), False),
    (["train.precision=bf16-mixed"], (9, 0), False),
    (["train.accelerator=cpu"], (9, 0), False),
])
def test_fp32_training_on_a_tensor_core_gpu_is_told_how_to_use_them(overrides, capability, warned):
    warning = training.slow_fp32_warning(load_config(None, overrides).train, capability)
    assert (warning is not None) == warned
    if warned:
        assert "train.matmul_precision=high" in warning and "bf16-mixed" in warning
