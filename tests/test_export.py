"""`sffn export`: a folder without pickles (safetensors, config, tokenizer, model card) that gives the
checkpoint's logits, and that `sffn eval` and `sffn sample` read as they read the checkpoint."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

from sffn_lab import training
from sffn_lab.checkpoints import load_checkpoint
from sffn_lab.config import load_config
from sffn_lab.experiments import DEFAULT_CONFIG
from sffn_lab.export import read_export
from tests.support import TINY, as_flags, run_cli

MOE = [*TINY, "model.ffn.kind=sigma_moe", "model.ffn.n_experts=4", "model.ffn.expert_size=16"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 12-step σ-MoE run with tied embeddings, trained as `sffn train` would train it."""
    out = tmp_path_factory.mktemp("export") / "runs"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["sffn", "train", *as_flags(MOE), "--max-steps", "12", "--out", str(out)])
        config = load_config(DEFAULT_CONFIG, [*MOE, "train.max_steps=12", f"train.out_dir={out}"])
        assert config.model.tie_embeddings
        return Path(training.train(config, progress=False).run_dir)


def test_an_export_gives_the_checkpoints_logits_in_float64(tmp_path, capsys, run_dir, seed):
    code, _, err = run_cli(["export", run_dir, "--out", tmp_path / "export"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "README.md", "config.yaml", "model.safetensors", "tokenizer.json"]
    original, exported = load_checkpoint(run_dir), read_export(tmp_path / "export")
    assert exported.config == original.config and exported.corpus == original.corpus
    tokens = torch.randint(0, original.corpus.vocab_size, (3, original.config.data.seq_len))  # seed printed
    logits = [m.double().eval()(tokens).logits for m in (original, exported)]
    assert torch.equal(logits[0], logits[1])  # the same weights: equal to the last bit, in float64


def test_eval_and_sample_read_an_export_folder_without_unpickling(tmp_path, capsys, run_dir, monkeypatch):
    export = tmp_path / "export"
    assert run_cli(["export", run_dir, "--out", export], capsys)[0] == 0
    results = {}
    for source in (run_dir, export):
        if source == export:  # from here on, any unpickling fails the test
            monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on an export"))
        code, out, err = run_cli(["eval", source, "--json"], capsys)
        assert code == 0, err
        evaluated = json.loads(out)
        code, out, err = run_cli(["sample", source, "--tokens", "20", "--seed", "3", "--top-k", "5"], capsys)
        assert code == 0, err
        results[source] = (evaluated["loss"], evaluated["tokens"], out)
    assert results[export] == results[run_dir]


def test_the_model_card_says_what_was_trained_on_what_and_how(tmp_path, capsys, run_dir):
    assert run_cli(["export", run_dir, "--out", tmp_path / "export"], capsys)[0] == 0  # its best: the final step
    card = (tmp_path / "export" / "README.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "| variant | sigma_moe: 4 experts of 16 cells, 2 per token |" in card
    assert f"{summary['total_params']:,} total, {summary['active_params']:,} active per token" in card
    assert "| corpus | synthetic (tokens, vocabulary 32) |" in card and "| tokenizer | symbol |" in card
    assert f"At step 12 (these weights): loss {summary['val_loss']:.4f} nats/token" in card
    assert "sffn train --set model.d_model=32" in card and "--max-steps 12" in card
    assert run_cli(["export", run_dir / "checkpoints" / "last.ckpt", "--out", tmp_path / "last"], capsys)[0] == 0
    last_card = (tmp_path / "last" / "README.md").read_text()
    assert "At step 12 (the run's last model, not these weights of step 10)" in last_card
    assert summary["command"] == shlex.join(["sffn", "train", *as_flags(MOE), "--max-steps", "12", "--out",
                                             str(Path(summary["run_dir"]).parent)])


def test_an_export_never_overwrites_and_a_damaged_one_is_refused(tmp_path, capsys, run_dir):
    export = tmp_path / "export"
    assert run_cli(["export", run_dir, "--out", export], capsys)[0] == 0
    code, _, err = run_cli(["export", run_dir, "--out", export], capsys)
    assert code == 2 and "already exists and is not an empty folder" in err
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for command in (["eval", export], ["sample", export]):
        code, _, err = run_cli(command, capsys)
        assert code == 2 and f"'{weights}' is not an sffn-lab export" in err and "Traceback" not in err
    (export / "config.yaml").unlink()
    code, _, err = run_cli(["eval", export], capsys)
    assert code == 2 and "config.yaml' does not exist" in err
