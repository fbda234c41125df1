"""``data.corpus=hf:NAME[:CONFIG]`` through the real ``datasets`` library, offline: small datasets the tests write
with ``datasets`` itself (save_to_disk, parquet files), the splits they have or 90/5/5, the chosen text column,
training on one through the command line, and a clear error for a dataset that is not available offline."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sffn_lab.config import DataConfig
from sffn_lab.data.corpora import byte_splits, load_corpus
from sffn_lab.errors import UserError
from tests.support import TINY, as_flags, run_cli

datasets = pytest.importorskip("datasets", reason="the test extra installs datasets")


WORDS = ["sparse", "expert", "router", "token", "gate", "layer", "memory", "block"]


def rows(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture
def three_splits(seed) -> dict[str, list[str]]:
    rng = random.Random(seed)  # the seed is printed: --seed replays it
    return {"train": rows(400, rng), "validation": rows(60, rng), "test": rows(50, rng)}


def test_a_saved_dataset_dict_gives_its_own_splits_from_the_chosen_column(tmp_path, three_splits):
    dataset = datasets.DatasetDict({split: datasets.Dataset.from_dict({"content": texts, "id": list(range(len(texts)))})
                                    for split, texts in three_splits.items()})
    dataset.save_to_disk(tmp_path / "saved")
    corpus = load_corpus(DataConfig(corpus=f"hf:{tmp_path / 'saved'}", text_column="content"))
    assert corpus.unit == "byte" and corpus.name == f"hf:{tmp_path / 'saved'}"
    for ours, theirs in (("train", "train"), ("valid", "validation"), ("test", "test")):
        assert bytes(corpus.splits[ours]) == "\n".join(three_splits[theirs]).encode()
    with pytest.raises(UserError, match=r"no column 'text' \(its columns: content, id\); choose one with data\.text"):
        load_corpus(DataConfig(corpus=f"hf:{tmp_path / 'saved'}"))


def test_parquet_files_with_only_a_train_split_are_cut_90_5_5_and_retokenized(tmp_path, three_splits):
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": three_splits["train"]}).to_parquet(folder / "train.parquet")
    corpus = load_corpus(DataConfig(corpus=f"hf:{folder}", cache_dir=str(tmp_path / "cache")))
    expected = byte_splits(np.frombuffer("\n".join(three_splits["train"]).encode(), dtype=np.uint8), None)
    assert {split: bytes(corpus.splits[split]) for split in expected} == {s: bytes(t) for s, t in expected.items()}
    words = load_corpus(DataConfig(corpus=f"hf:{folder}", tokenizer="word", cache_dir=str(tmp_path / "cache")))
    assert words.unit == "word" and words.split_bytes == {split: len(t) for split, t in expected.items()}
    assert set(WORDS) <= set(words.tokenizer.words)  # the vocabulary learned from the train split


def test_training_on_an_hf_dataset_through_the_command_line(tmp_path, capsys, three_splits):
    datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": texts}) for split, texts in three_splits.items()}
                         ).save_to_disk(tmp_path / "saved")
    overrides = [o for o in TINY if not o.startswith("data.synthetic")]
    code, _, err = run_cli(["train", *as_flags(overrides), "--data", f"hf:{tmp_path / 'saved'}", "--max-steps", "3",
                            "--out", tmp_path / "runs", "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert summary["unit"] == "byte" and summary["step"] == 3


def test_a_hub_dataset_not_available_offline_names_it_and_how_to_make_it_available(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_DATASETS_OFFLINE=1 at import sets it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as refused:
        load_corpus(DataConfig(corpus="hf:someone/absent-corpus:tiny"))
    message = str(refused.value)
    assert "The dataset 'someone/absent-corpus' (config tiny) could not be loaded" in message
    assert "save_to_disk" in message and "data.corpus=hf:DIR" in message
