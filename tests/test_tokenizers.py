"""data.tokenizer: round trips, saved tokenizers, caches keyed by the text's checksum, split bytes, GPT-2 offline."""

from __future__ import annotations

import hashlib
import json
import os
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sffn_lab.config import DataConfig, load_config, parse_tokenizer
from sffn_lab.data import corpora
from sffn_lab.data.corpora import CorpusSpec, RemoteFile, load_corpus, named_corpus
from sffn_lab.data.subword import (
    GPT2_URL,
    ByteLevelBPETokenizer,
    GPT2Tokenizer,
    SentencePieceTokenizer,
    encode_in_pieces,
    text_pieces,
)
from sffn_lab.data.tokenizers import ByteTokenizer, WordTokenizer, tokenizer_from_dict, tokenizer_to_dict
from sffn_lab.errors import UserError
from tests.support import TINY, as_flags, run_cli

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is not present")


def random_words(rng: random.Random, n_words: int) -> str:
    """English-like text: words of a small vocabulary, spaces, punctuation, newlines and runs of white space."""
    vocabulary = ["".join(rng.choice("etaoinshrdlcumwfgypbvk") for _ in range(rng.randint(1, 8))) for _ in range(300)]
    separators = [" "] * 12 + [", ", ".\n", "\n\n", "  ", " \n", "\n ", "\t\n", " \n\n  "]
    return "".join(rng.choice(vocabulary) + rng.choice(separators) for _ in range(n_words))


def random_unicode(rng: random.Random, n_chars: int) -> str:
    """Any characters: ASCII, whitespace runs, digits, accents, CJK, emoji (astral), SentencePiece's "▁", controls."""
    alphabets = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        " \n\t\r\n\n  \x0b\x0c\u00a0\u2028",
        "0123456789",
        "éüñßøçÅ",
        "日本語中文한국어",
        "😀🎉👍🏽🧪",
        "\u2581",
        "\x00\x01\x1b\x7f",
    ]
    parts = [rng.choice(rng.choice(alphabets)) for _ in range(n_chars)]
    parts += [chr(rng.choice([rng.randrange(0x20, 0xD800), rng.randrange(0xE000, 0x110000)])) for _ in range(20)]
    parts += ["<|endoftext|>", "<unk>", "<0x41>", "\n"]
    rng.shuffle(parts)
    return "".join(parts)


def gpt2_byte_stand_ins() -> dict[int, str]:
    """GPT-2's own byte → printable character table, written as in OpenAI's encoder.py (an independent check)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(others)}}


TINY_GPT2_MERGES = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n"), ("Ġ", "t"), ("Ġ", "Ċ"), ("Ċ", "Ċ")]


def write_tiny_gpt2_files(folder: Path) -> dict[str, int]:
    """A small vocab.bpe / encoder.json pair in GPT-2's data-gym format → the ids of its merged tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    stand_ins = gpt2_byte_stand_ins()
    encoder = {stand_ins[b]: i for i, b in enumerate(stand_ins)}
    for first, second in TINY_GPT2_MERGES:
        encoder[first + second] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in TINY_GPT2_MERGES))
    (folder / "encoder.json").write_text(json.dumps(encoder))
    return encoder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """SentencePiece and BPE trained once on English-like text with runs of white space (and tinyshakespeare's
    start when present)."""
    text = (SHAKESPEARE.read_text()[:200_000] if SHAKESPEARE.is_file() else "") + random_words(random.Random(0), 30_000)
    folder = tmp_path_factory.mktemp("gpt2")
    write_tiny_gpt2_files(folder)
    return {"text": text, "sentencepiece": SentencePieceTokenizer.train(text, 1000),
            "bpe": ByteLevelBPETokenizer.train(text, 1000), "gpt2": GPT2Tokenizer(folder),
            "word": WordTokenizer.from_text(text), "byte": ByteTokenizer()}


# ----------------------------------------------------------------------------------------------- round trips


@needs_shakespeare
@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "bpe", "gpt2"])
def test_tinyshakespeare_round_trips(trained, kind):
    tokenizer, text = trained[kind], SHAKESPEARE.read_text()[200_000:400_000]  # text it was not trained on
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    if kind == "sentencepiece":
        assert tokenizer.processor.id_to_piece(tokenizer.encode("\n")) == ["\n"]  # a piece, not a fallback byte
    if kind in ("sentencepiece", "bpe"):
        assert len(ids) < 0.6 * len(text)  # subwords, not characters
        assert 0 <= min(ids) and max(ids) < tokenizer.vocab_size


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "bpe", "gpt2"])
def test_random_unicode_round_trips(trained, kind, seed):
    text = random_unicode(random.Random(seed), 3000)
    tokenizer = trained[kind]
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_word_round_trip_on_whitespace_normalised_text(trained, seed):
    rng = random.Random(seed)
    words = trained["text"].split()
    text = " ".join(rng.choice(words) for _ in range(500))
    tokenizer = trained["word"]
    ids = tokenizer.encode(text)
    assert tokenizer.index["<unk>"] not in ids and tokenizer.decode(ids) == text


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe", "gpt2"])
def test_a_long_text_encoded_in_pieces_gets_the_ids_of_encoding_it_at_once(trained, kind, seed):
    rng = random.Random(seed)
    text = random_words(rng, 2000) + random_unicode(rng, 500) + random_words(rng, 2000)
    tokenizer = trained[kind]
    chars = rng.randint(20, 200)
    assert "".join(text_pieces(text, chars)) == text and len(list(text_pieces(text, chars))) > 10
    assert encode_in_pieces(tokenizer.encode, text, chars).tolist() == tokenizer.encode(text)


@pytest.mark.parametrize("kind", ["byte", "word", "sentencepiece", "bpe", "gpt2"])
def test_saved_tokenizers_encode_identically(trained, kind, seed):
    text = random_words(random.Random(seed), 500) + (random_unicode(random.Random(seed), 300) if kind != "word" else "")
    tokenizer = trained[kind]
    loaded = tokenizer_from_dict(json.loads(json.dumps(tokenizer_to_dict(tokenizer))))
    assert type(loaded) is type(tokenizer) and loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))


def test_gpt2_from_a_data_gym_pair(tmp_path):
    ids = write_tiny_gpt2_files(tmp_path)
    tokenizer = GPT2Tokenizer(tmp_path)
    assert tokenizer.vocab_size == 256 + len(TINY_GPT2_MERGES) + 1
    assert tokenizer.encode("the then in") == [ids["the"], ids["Ġthe"], ids["n"], ids["Ġ"], ids["in"]]
    assert tokenizer.encode("<|endoftext|>") != [ids["<|endoftext|>"]]  # ordinary text, not the special token

    (tmp_path / "encoder.json").write_text(json.dumps({**ids, "the": 0}))
    with pytest.raises(UserError, match="not the published pair"):
        GPT2Tokenizer(tmp_path)


def test_the_published_gpt2_encoding_when_its_files_are_cached():
    folder = corpora.cache_root(DataConfig()) / "gpt2"
    if not all((folder / name).is_file() for name in ("vocab.bpe", "encoder.json")):
        pytest.skip(f"GPT-2's files are not in {folder} (no network here)")
    tokenizer = GPT2Tokenizer(folder)
    assert tokenizer.vocab_size == 50257 and tokenizer.encode("Hello world") == [15496, 995]


# ----------------------------------------------------------------------------------------------- corpora


@needs_shakespeare
@pytest.mark.parametrize("spec", ["", "byte", "word", "sentencepiece:2000", "bpe:2000"])
def test_tinyshakespeare_splits_and_their_bytes(tmp_path, spec):
    corpus = load_corpus(DataConfig(corpus=str(SHAKESPEARE), cache_dir=str(tmp_path), tokenizer=spec))
    data = SHAKESPEARE.read_bytes()
    ends = np.cumsum([corpus.split_bytes[s] for s in ("train", "valid", "test")])
    assert ends[-1] == len(data) and corpus.split_bytes["valid"] == len(data) // 20
    assert corpus.unit == {"": "byte", "byte": "byte", "word": "word"}.get(spec, "token")
    for split, start, end in zip(("train", "valid", "test"), [0, *ends[:-1]], ends, strict=True):
        ids = corpus.splits[split]
        if corpus.unit == "byte":
            assert corpus.split_bytes[split] == len(ids)
        if spec.startswith(("sentencepiece", "bpe")):
            decoded = corpus.tokenizer.decode(ids.tolist())
            assert len(decoded.encode()) == corpus.split_bytes[split] and decoded.encode() == data[start:end]
            assert ids.dtype == np.int32 and len(ids) < corpus.split_bytes[split] / 2
    if spec.startswith(("sentencepiece", "bpe")):
        assert corpus.vocab_size == 2000


def wikitext_like(tmp_path: Path) -> tuple[CorpusSpec, dict[str, str]]:
    texts = {"train": " = A = \n the cat sat , ünï 12 \n\n the dog \n" * 200, "valid": " the cow sat \n" * 20,
             "test": " a dog 😀 \n" * 20}
    archive = tmp_path / "wt.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for split, text in texts.items():
            z.writestr(f"wt/wiki.{split}.tokens", text)
    spec = CorpusSpec("wiki", "word", RemoteFile(archive.as_uri(), "wt.zip"),
                      {s: f"wt/wiki.{s}.tokens" for s in ("train", "valid", "test")})
    return spec, texts


@pytest.mark.parametrize("spec", ["", "word", "byte", "bpe:300"])
def test_a_word_corpus_keeps_its_text_and_counts_its_bytes(tmp_path, spec):
    corpus_spec, texts = wikitext_like(tmp_path)
    corpus = named_corpus(corpus_spec, tmp_path / "cache", spec)
    assert corpus.split_bytes == {split: len(text.encode()) for split, text in texts.items()}
    assert corpus.unit == {"": "word", "word": "word", "byte": "byte"}.get(spec, "token")
    for split, text in texts.items():
        ids = corpus.splits[split].tolist()
        if spec == "byte":
            assert bytes(ids) == text.encode()
        elif spec == "bpe:300":
            assert corpus.tokenizer.decode(ids) == text


def test_gpt2_on_a_corpus_downloads_its_files_once_and_round_trips(tmp_path, monkeypatch):
    remote = tmp_path / "openai"
    write_tiny_gpt2_files(remote)
    remotes = tuple(RemoteFile((remote / name).as_uri(), name, sha256=hashlib.sha256((remote / name).read_bytes())
                               .hexdigest()) for name in ("vocab.bpe", "encoder.json"))
    monkeypatch.setattr(corpora, "GPT2_REMOTES", remotes)
    path = tmp_path / "c.txt"
    path.write_text(random_words(random.Random(1), 3000))
    corpus = load_corpus(DataConfig(corpus=str(path), cache_dir=str(tmp_path / "cache"), tokenizer="gpt2"))
    assert (tmp_path / "cache" / "gpt2" / "encoder.json").is_file()
    assert corpus.unit == "token" and corpus.vocab_size == 256 + len(TINY_GPT2_MERGES) + 1
    text = b"".join(bytes(corpus.tokenizer.decode(corpus.splits[s].tolist()), "utf-8") for s in corpora.SPLITS)
    assert text == path.read_bytes()
    assert tokenizer_to_dict(corpus.tokenizer) == {"kind": "gpt2", "folder": str(tmp_path / "cache" / "gpt2")}


def test_gpt2_offline_names_the_files_the_url_and_the_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(corpora.urllib.request, "urlopen", offline)
    monkeypatch.setattr(corpora, "RETRY_DELAYS_S", (0.0, 0.0))
    path = tmp_path / "c.txt"
    path.write_text(random_words(random.Random(2), 500))
    with pytest.raises(UserError) as info:
        load_corpus(DataConfig(corpus=str(path), cache_dir=str(tmp_path / "cache"), tokenizer="gpt2"))
    message = str(info.value)
    assert "vocab.bpe" in message and "encoder.json" in message and GPT2_URL in message
    assert f"'{tmp_path / 'cache' / 'gpt2'}'" in message
    with pytest.raises(UserError, match=r"vocab\.bpe and encoder\.json"):  # a run directory's tokenizer.json, offline
        tokenizer_from_dict({"kind": "gpt2", "folder": str(tmp_path / "elsewhere")})


def test_the_cache_is_rebuilt_when_the_corpus_changes_and_reused_when_not(tmp_path, monkeypatch, seed):
    trainings = []
    train_tokenizer = corpora.train_tokenizer

    def counting(*args):
        trainings.append(args[:2])
        return train_tokenizer(*args)

    monkeypatch.setattr(corpora, "train_tokenizer", counting)
    path = tmp_path / "c.txt"
    path.write_text(random_words(random.Random(seed), 4000))
    cfg = DataConfig(corpus=str(path), cache_dir=str(tmp_path / "cache"), tokenizer="bpe:300")
    first = load_corpus(cfg)
    (model,) = (tmp_path / "cache" / "files" / "c.txt").glob("tokenizer.*.json")
    again = load_corpus(cfg)
    assert trainings == [("bpe", 300)] and np.array_equal(first.splits["valid"], again.splits["valid"])
    assert list((tmp_path / "cache" / "files" / "c.txt").glob("tokenizer.*.json")) == [model]

    # Same size, same modification time, different text: only a checksum sees the change.
    stat = path.stat()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3].upper() + data[len(data) // 3 :])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = load_corpus(cfg)
    assert trainings == [("bpe", 300)] * 2
    assert len(list((tmp_path / "cache" / "files" / "c.txt").glob("tokenizer.*.json"))) == 2
    decoded = "".join(changed.tokenizer.decode(changed.splits[s].tolist()) for s in corpora.SPLITS)
    assert decoded == path.read_text()


# ----------------------------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize("spec, parsed", [("", ("", 0)), ("byte", ("byte", 0)), ("gpt2", ("gpt2", 0)),
                                          ("sentencepiece:8000", ("sentencepiece", 8000)), ("bpe:300", ("bpe", 300))])
def test_tokenizer_specs(spec, parsed):
    assert parse_tokenizer(spec) == parsed
    assert load_config(overrides=[f"data.tokenizer={spec}"]).data.tokenizer == spec


@pytest.mark.parametrize("spec, message", [
    ("sentencepeice:8000", "Did you mean 'sentencepiece'"), ("bpe:0", "above 256"), ("bpe", "above 256"),
    ("bpe:8k", "above 256"), ("sentencepiece:256", "above 256"), ("gpt2:100", "no vocabulary size"),
    ("bytes", "Did you mean 'byte'"),
])
def test_bad_tokenizer_specs_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        load_config(overrides=[f"data.tokenizer={spec}"])


def test_the_synthetic_corpus_refuses_a_tokenizer():
    with pytest.raises(UserError, match=r"synthetic corpus.*data\.tokenizer=bpe:300"):
        load_corpus(DataConfig(tokenizer="bpe:300"))


def test_train_with_bpe_then_sample_from_the_run_directory_alone(tmp_path, capsys, seed):
    corpus = tmp_path / "words.txt"
    corpus.write_text(random_words(random.Random(seed), 8000))
    cache = tmp_path / "cache"
    code, _, err = run_cli(["train", *as_flags(TINY), "--max-steps", "3", "--data", corpus, "--out", tmp_path / "runs",
                            "--no-progress", "--set", "data.tokenizer=bpe:300", "--set", f"data.cache_dir={cache}"],
                           capsys)
    assert code == 0, err
    run_dir = next((tmp_path / "runs").iterdir())
    saved = json.loads((run_dir / "tokenizer.json").read_text())
    assert saved["kind"] == "bpe"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["unit"] == "token" and summary["step"] == 3
    # bits per byte of the validation text: bits per token × the split's tokens / its UTF-8 bytes
    from sffn_lab.config import DataConfig
    from sffn_lab.data.corpora import load_corpus

    loaded = load_corpus(DataConfig(corpus=str(corpus), tokenizer="bpe:300", cache_dir=str(cache)))
    tokens_per_byte = len(loaded.splits["valid"]) / loaded.split_bytes["valid"]
    assert 0.2 < tokens_per_byte < 1  # a subword covers more than one byte
    assert summary["val_bpb"] == pytest.approx(summary["val_bits"] * tokens_per_byte, rel=1e-6)
    corpus.unlink()
    for path in sorted(cache.rglob("*"), reverse=True):  # sampling needs neither the corpus nor its caches
        path.rmdir() if path.is_dir() else path.unlink()
    code, out, err = run_cli(["sample", run_dir, "--prompt", "the cat", "--tokens", "5"], capsys)
    assert code == 0 and out.startswith("the cat"), err
    assert len(tokenizer_from_dict(saved).encode(out.rstrip("\n"))) >= 2
