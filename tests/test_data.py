"""Corpora and the DataModule: splits, exact evaluation coverage, training windows, downloads, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sffn_lab.config import DataConfig, SyntheticConfig
from sffn_lab.data import corpora
from sffn_lab.data.corpora import CorpusSpec, RemoteFile, byte_splits, load_corpus, named_corpus
from sffn_lab.data.datamodule import IGNORE_INDEX, EvalWindows, LMDataModule, TrainWindows
from sffn_lab.data.synthetic import entropy_rate_bits, generate_tokens, make_sources
from sffn_lab.errors import UserError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def write_text(path: Path, n_bytes: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    data = bytes(rng.choice(list(b"abcdefgh ij\n"), size=n_bytes).tolist())
    path.write_bytes(data)
    return data


def test_byte_splits_are_contiguous_90_5_5(tmp_path):
    n = int(np.random.default_rng().integers(2_000, 5_000))
    data = write_text(tmp_path / "c.txt", n, seed=n)
    corpus = load_corpus(DataConfig(corpus=str(tmp_path / "c.txt"), cache_dir=str(tmp_path / "cache")))
    s = corpus.splits
    assert len(s["valid"]) == len(s["test"]) == n // 20 and sum(map(len, s.values())) == n
    assert bytes(np.concatenate([s["train"], s["valid"], s["test"]])) == data
    enwik_like = byte_splits(np.arange(100, dtype=np.int64), (90, 5, 5))
    assert [len(v) for v in enwik_like.values()] == [90, 5, 5] and enwik_like["test"][0] == 95


@pytest.mark.parametrize("seq_len", [7, 16, 33])
def test_eval_windows_score_every_token_exactly_once(seq_len):
    tokens = np.random.default_rng().integers(0, 50, size=int(np.random.default_rng().integers(100, 300)))
    seen = np.zeros(len(tokens), dtype=int)
    for world in (1, 3):
        seen[:] = 0
        for rank in range(world):
            windows = EvalWindows(tokens, seq_len, rank, world)
            for i in range(len(windows)):
                x, y = windows[i]
                start = windows.windows[i] * seq_len
                scored = (y != IGNORE_INDEX).nonzero().flatten()
                for j in scored.tolist():
                    assert y[j] == tokens[start + j + 1] and x[j] == tokens[start + j]
                    seen[start + j + 1] += 1
        assert seen[0] == 0 and (seen[1:] == 1).all()


def test_train_batches_are_a_function_of_seed_and_step_and_ranks_slice_the_global_batch():
    tokens = np.random.default_rng().integers(0, 100, size=10_000)
    one = TrainWindows(tokens, 16, 8, seed=3, start_step=0)
    x5, y5 = one.batch(5)
    assert torch.equal(x5[:, 1:], y5[:, :-1]) and x5.shape == (8, 16)
    assert torch.equal(TrainWindows(tokens, 16, 8, seed=3, start_step=5).batch(5)[0], x5)
    assert not torch.equal(one.batch(6)[0], x5)
    assert not torch.equal(TrainWindows(tokens, 16, 8, seed=4, start_step=0).batch(5)[0], x5)
    halves = [TrainWindows(tokens, 16, 8, 3, 0, rank=r, world_size=2).batch(5)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), x5)
    resumed = iter(TrainWindows(tokens, 16, 8, seed=3, start_step=5))
    assert torch.equal(next(resumed)[0], x5)


def test_synthetic_corpus_is_seeded_and_below_unigram_entropy():
    cfg = DataConfig(synthetic=SyntheticConfig(train_tokens=20_000, valid_tokens=2_000, test_tokens=2_000))
    a, b = LMDataModule(cfg, seed=0), LMDataModule(cfg, seed=1)
    assert np.array_equal(a.split_tokens("train"), b.split_tokens("train"))  # the corpus seed, not the run's
    assert not np.array_equal(a.split_tokens("train"), a.split_tokens("valid")[: len(a.split_tokens("train"))])
    assert a.entropy_rate_bits < a.unigram_entropy_bits - 1
    assert a.decode(a.encode(a.decode(list(range(10))))) == a.decode(list(range(10)))


def test_synthetic_entropy_rate_matches_the_empirical_conditional_entropy():
    """Estimate −log2 p(x_t | context, source) on a fresh sample with the true tables (a float64 check)."""
    seed = int(np.random.default_rng().integers(1000))
    cfg = SyntheticConfig(seed=seed, vocab_size=12, order=2, n_sources=3, doc_length=256)
    sources = make_sources(cfg)
    n_docs = 600
    tokens = generate_tokens(cfg, sources, n_docs * cfg.doc_length, stream=5).astype(np.int64)
    docs = tokens.reshape(n_docs, cfg.doc_length)
    a = sources.alphabet
    # The true source is unknown to a predictor; its posterior after a whole document is certain, so
    # the per-document code length is log2 n + −log2 p(doc | s*) up to H(source | doc) ≈ 0.
    total = 0.0
    for doc in docs:
        content = doc[1:] - 1
        logp = []
        for s in range(cfg.n_sources):
            ctx0 = content[0] * a + content[1]
            lp = np.log2(sources.stationary[s, ctx0])
            ctx = content[:-2] * a + content[1:-1]
            lp += np.log2(sources.transitions[s, ctx, content[2:]]).sum()
            logp.append(lp)
        logp = np.array(logp)
        total += -(np.logaddexp2.reduce(logp) - np.log2(cfg.n_sources))
    empirical = total / tokens.size
    # Sampling error of a 150k-token mean: a few hundredths of a bit at most.
    assert abs(empirical - entropy_rate_bits(cfg, sources)) < 0.03


def test_word_corpus_vocabulary_eos_and_unk(tmp_path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    archive = folder / "wt.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("wt/wiki.train.tokens", " = A = \n the cat sat \n\n the dog \n" * 40)
        z.writestr("wt/wiki.valid.tokens", " the cow sat \n" * 10)
        z.writestr("wt/wiki.test.tokens", " a dog \n" * 10)
    spec = CorpusSpec("wiki", "word", RemoteFile(archive.as_uri(), "wt.zip"), {s: f"wt/wiki.{s}.tokens" for s in
                                                                            ("train", "valid", "test")})
    corpus = named_corpus(spec, tmp_path / "cache")
    tok = corpus.tokenizer
    train = list(corpus.splits["train"][:10])
    assert [tok.words[i] for i in train] == ["=", "A", "=", "<eos>", "the", "cat", "sat", "<eos>", "<eos>", "the"]
    valid = [tok.words[i] for i in corpus.splits["valid"][:4]]
    assert valid == ["the", "<unk>", "sat", "<eos>"]
    assert tok.words[0] in ("<eos>", "the")  # most frequent first
    again = named_corpus(spec, tmp_path / "cache")  # served from the memory-mapped cache
    assert np.array_equal(again.splits["valid"], corpus.splits["valid"])


def test_download_is_verified_and_atomic(tmp_path):
    source = tmp_path / "remote.txt"
    data = write_text(source, 3000, seed=1)
    good = RemoteFile(source.as_uri(), "corpus.txt", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    spec = CorpusSpec("tiny", "byte", good, {"*": "corpus.txt"})
    corpus = named_corpus(spec, tmp_path / "cache")
    assert bytes(corpus.splits["train"][:50]) == data[:50]
    assert not list((tmp_path / "cache" / "tiny").glob(".*tmp*"))

    bad = RemoteFile(source.as_uri(), "corpus.txt", size=len(data), sha256="0" * 64)
    with pytest.raises(UserError, match="Checksum mismatch"):
        named_corpus(CorpusSpec("other", "byte", bad, {"*": "corpus.txt"}), tmp_path / "cache")


def test_a_cached_file_corrupted_later_is_detected(tmp_path):
    source = tmp_path / "remote.txt"
    write_text(source, 3000, seed=2)
    spec = CorpusSpec("tiny", "byte", RemoteFile(source.as_uri(), "corpus.txt"), {"*": "corpus.txt"})
    named_corpus(spec, tmp_path / "cache")  # first use records the checksum
    cached = tmp_path / "cache" / "tiny" / "corpus.txt"
    cached.write_bytes(cached.read_bytes()[:-10] + b"XXXXXXXXXX")
    with pytest.raises(UserError, match=r"Checksum mismatch.*corpus\.txt"):
        named_corpus(spec, tmp_path / "cache")


def test_offline_error_names_url_and_place_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(corpora.urllib.request, "urlopen", offline)
    monkeypatch.setattr(corpora, "RETRY_DELAYS_S", (0.0, 0.0))
    with pytest.raises(UserError) as info:
        load_corpus(DataConfig(corpus="tinyshakespeare", cache_dir=str(tmp_path)))
    message = str(info.value)
    assert corpora.TINYSHAKESPEARE_URL in message and str(tmp_path / "tinyshakespeare" / "input.txt") in message
    assert not any((tmp_path / "tinyshakespeare").iterdir())


def test_a_truncated_download_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "RETRY_DELAYS_S", (0.0, 0.0))
    source = tmp_path / "remote.txt"
    data = write_text(source, 500, seed=3)
    spec = CorpusSpec("t", "byte", RemoteFile(source.as_uri(), "c.txt", size=len(data) + 1), {"*": "c.txt"})
    with pytest.raises(UserError, match="incomplete"):
        named_corpus(spec, tmp_path / "cache")
    assert not (tmp_path / "cache" / "t" / "c.txt").exists()


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"\x00\x01\x02binary" * 100, "binary"), (b"short text", "fewer than one window")],
)
def test_bad_corpus_files(tmp_path, content, message):
    path = tmp_path / "c.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        LMDataModule(DataConfig(corpus=str(path), seq_len=64, cache_dir=str(tmp_path)), seed=0)


def test_unknown_corpus_name_suggests_the_closest():
    with pytest.raises(UserError, match="Did you mean 'enwik8'"):
        load_corpus(DataConfig(corpus="enwik9"))
    with pytest.raises(UserError, match="does not exist"):
        load_corpus(DataConfig(corpus="missing/file.txt"))


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data/tinyshakespeare.txt is not present")
def test_tinyshakespeare_from_the_shared_file(tmp_path):
    data = LMDataModule(DataConfig(corpus=str(SHAKESPEARE), seq_len=64, cache_dir=str(tmp_path)), seed=0)
    assert data.vocab_size == 256 and data.unit == "byte"
    assert bytes(data.split_tokens("train")[:14]) == b"First Citizen:"
    assert 4.0 < data.unigram_entropy_bits < 5.0
    # The file is the published one: the registry's checksum matches it.
    assert corpora.sha256_of(SHAKESPEARE) == corpora.REGISTRY["tinyshakespeare"].remote.sha256


def test_download_retries_then_falls_back_to_a_mirror_with_a_user_agent(tmp_path, monkeypatch):
    source = tmp_path / "remote.txt"
    data = write_text(source, 800, seed=4)
    calls = []
    real_urlopen = corpora.urllib.request.urlopen

    def flaky(request, timeout):
        calls.append((request.full_url, request.get_header("User-agent")))
        if "primary" in request.full_url:
            raise OSError("connection reset")
        return real_urlopen(request, timeout=timeout)

    monkeypatch.setattr(corpora.urllib.request, "urlopen", flaky)
    monkeypatch.setattr(corpora, "RETRY_DELAYS_S", (0.0, 0.0))
    remote = RemoteFile("http://primary.invalid/c.txt", "c.txt", size=len(data), mirrors=(source.as_uri(),))
    corpora.download(remote, tmp_path / "cache" / "c.txt")
    assert (tmp_path / "cache" / "c.txt").read_bytes() == data
    # 3 tries, then the mirror
    assert [url for url, _ in calls] == ["http://primary.invalid/c.txt"] * 3 + [source.as_uri()]
    assert all(agent == corpora.USER_AGENT for _, agent in calls)


def published_locally(monkeypatch, tmp_path, names) -> dict[str, bytes]:
    """The registry's corpora ``names`` served from local files (file:// URLs) with their size and sha256, and
    downloads without waits between tries."""
    monkeypatch.setattr(corpora, "RETRY_DELAYS_S", (0.0, 0.0))
    texts = {}
    (tmp_path / "remote").mkdir()
    for i, name in enumerate(names):
        spec = corpora.REGISTRY[name]
        texts[name] = write_text(tmp_path / "remote" / name, 4000, seed=10 + i)
        remote = RemoteFile("http://offline.invalid/" + spec.remote.filename, spec.remote.filename,
                            size=len(texts[name]), sha256=hashlib.sha256(texts[name]).hexdigest(),
                            mirrors=((tmp_path / "remote" / name).as_uri(),))
        monkeypatch.setitem(corpora.REGISTRY, name, CorpusSpec(name, "byte", remote, {"*": spec.remote.filename}))
    return texts


def test_data_download_fills_the_cache_that_an_offline_run_then_reads(tmp_path, monkeypatch, capsys):
    from tests.support import run_cli

    texts = published_locally(monkeypatch, tmp_path, ["tinyshakespeare"])
    cache = tmp_path / "cache"
    code, out, err = run_cli(["data", "download", "tinyshakespeare", "--cache-dir", cache], capsys)
    assert code == 0, err
    cached = cache / "tinyshakespeare" / "input.txt"
    assert cached.read_bytes() == texts["tinyshakespeare"] and "downloaded and verified" in out
    recorded = (cache / "tinyshakespeare" / "input.txt.sha256").read_text()
    assert recorded == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert not list(cache.glob("*/.*tmp*"))

    def offline(*args, **kwargs):
        raise AssertionError("no download once the cache holds the corpus")

    monkeypatch.setattr(corpora.urllib.request, "urlopen", offline)
    corpus = load_corpus(DataConfig(corpus="tinyshakespeare", cache_dir=str(cache)))
    assert bytes(corpus.splits["train"][:64]) == texts["tinyshakespeare"][:64]
    code, out, err = run_cli(["data", "download", "tinyshakespeare", "--cache-dir", cache], capsys)
    assert code == 0 and "already in the cache, verified" in out


def test_data_download_all_and_its_mistakes(tmp_path, monkeypatch, capsys):
    from tests.support import run_cli

    published_locally(monkeypatch, tmp_path, list(corpora.REGISTRY))
    code, out, err = run_cli(["data", "download", "--all", "--cache-dir", tmp_path / "c"], capsys)
    assert code == 0, err
    assert all((tmp_path / "c" / name / spec.remote.filename).is_file() for name, spec in corpora.REGISTRY.items())

    for args, message in ((["enwik8", "enwik9"], "Did you mean 'enwik8'"), (["synthetic"], "nothing to download"),
                          ([], "or give --all"), (["enwik8", "--all"], "or give --all")):
        code, _, err = run_cli(["data", "download", *args, "--cache-dir", tmp_path / "d"], capsys)
        assert code == 2 and message in err and "Traceback" not in err
        assert not (tmp_path / "d").exists()  # nothing downloaded before a name is refused

    monkeypatch.setitem(corpora.REGISTRY, "text8", dataclasses.replace(
        corpora.REGISTRY["text8"], remote=dataclasses.replace(corpora.REGISTRY["text8"].remote, sha256="0" * 64)))
    code, out, err = run_cli(["data", "download", "enwik8", "text8", "--cache-dir", tmp_path / "e"], capsys)
    assert code == 2 and "enwik8: downloaded and verified" in out and "text8: Checksum mismatch" in err
