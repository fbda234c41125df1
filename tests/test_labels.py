"""Labels that say what the code measures: perplexity per token of every corpus with its unit, bits per byte
for byte corpora, both defaults in ``config keys``, and commands given the wrong kind of folder or file saying
what it is."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support import TINY, as_flags, run_cli


def train(tmp_path: Path, capsys, *extra) -> tuple[str, Path]:
    code, out, err = run_cli(["train", *as_flags(TINY), "--max-steps", "10", "--out", tmp_path / "runs",
                              "--no-progress", *extra], capsys)
    assert code == 0, err
    return " ".join(out.split()), Path(json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())[
        "run_dir"])


@pytest.fixture(scope="module")
def byte_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text("the cat sat on the mat; the dog sat on the log.\n" * 400)
    return path


def test_perplexity_per_token_for_every_corpus_and_bits_per_byte_for_bytes(tmp_path, capsys, byte_text):
    out, synthetic = train(tmp_path / "s", capsys)
    assert "validation bits per token" in out and "validation perplexity per token" in out
    summary = json.loads((synthetic / "summary.json").read_text())
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-6)

    out, byte_run = train(tmp_path / "b", capsys, "--data", str(byte_text))
    assert "validation bits per byte" in out and "validation perplexity per byte" in out
    assert "character" not in out
    code, out, err = run_cli(["eval", byte_run, "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["unit"] == "byte" and result["ppl"] == pytest.approx(math.exp(result["loss"]))
    code, out, err = run_cli(["eval", byte_run], capsys)
    assert code == 0 and "perplexity per byte" in out and "bits per byte" in out

    # curves of runs on different corpora: drawn, with a warning naming each run's corpus
    code, out, err = run_cli(["plot", synthetic, byte_run, "-o", tmp_path / "c.png"], capsys)
    text = " ".join((out + err).split())
    assert code == 0 and "different corpora" in text and "synthetic" in text and "words.txt" in text
    code, out, err = run_cli(["plot", synthetic, synthetic, "-o", tmp_path / "d.png"], capsys)
    assert code == 0 and "different corpora" not in out + err

    # sffn report on folders that are not sweeps says what they are
    code, _, err = run_cli(["report", synthetic], capsys)
    assert code == 2 and "is a run directory of sffn train, not a sweep" in " ".join(err.split())
    code, _, err = run_cli(["report", tmp_path / "s" / "runs"], capsys)
    assert code == 2 and "holds 1 run directories of sffn train" in " ".join(err.split()) and "sffn plot" in err


def test_config_keys_shows_the_built_in_and_the_default_experiment_values(capsys):
    code, out, err = run_cli(["config", "keys"], capsys)
    assert code == 0, err
    rows = {cells[0]: cells[1:] for line in out.splitlines()
            if len(cells := [c.strip() for c in line.strip("│┃ ").split("│")]) >= 4}
    assert rows["model.n_layers"][1:3] == ["4", "2"]  # built-in, sffn train (experiments/default.yaml)
    assert rows["train.max_steps"][1:3] == ["1000", "1200"]
    assert rows["model.d_model"][1:3] == ["128", "128"]
