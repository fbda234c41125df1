"""The corpus registry: named corpora, local text files and the synthetic default, as token splits.

``load_corpus(cfg)`` returns a ``Corpus``: train/valid/test token arrays (memory-mapped from a
cache), a tokenizer, and what the reports need (unit, bytes of each split's text, entropy rate for the
synthetic corpus).

A text corpus comes in its own unit (bytes, or words for WikiText), or re-tokenized by ``data.tokenizer``:
``byte`` (UTF-8 bytes), ``word``, ``sentencepiece:<size>`` or ``bpe:<size>`` (trained on the training split)
or ``gpt2``. Trained tokenizers and the token arrays are cached beside the corpus under keys that hold the
tokenizer spec and the sha256 of the text they come from, so a changed corpus gets new ones.

Named corpora are downloaded into ``cache_dir`` (``data.cache_dir``, else ``$SFFN_DATA``, else
``~/.cache/sffn-lab``) to a temporary name, verified, then renamed, so a half-written or corrupt
file is never used. Verification uses the published size of the file (and its sha256 where we
know it); after the first verified use, the file's sha256 is recorded beside it and checked
every later time, so later corruption or truncation is caught too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from sffn_lab.config import DataConfig, parse_tokenizer
from sffn_lab.data import synthetic
from sffn_lab.data.subword import (
    GPT2_FILES,
    GPT2_URL,
    ByteLevelBPETokenizer,
    GPT2Tokenizer,
    SentencePieceTokenizer,
    gpt2_files_help,
)
from sffn_lab.data.tokenizers import (
    ByteTokenizer,
    SymbolTokenizer,
    Tokenizer,
    WordTokenizer,
    tokenizer_from_dict,
    tokenizer_to_dict,
)
from sffn_lab.errors import UserError, did_you_mean

SPLITS = ("train", "valid", "test")


@dataclass
class Corpus:
    name: str
    unit: str  # "byte", "word" or "token"
    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]  # 1-D token arrays (often np.memmap)
    entropy_rate_bits: float | None = None
    # UTF-8 bytes of each split's original text, for bits per byte (empty for the synthetic corpus)
    split_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def unigram_entropy_bits(self) -> float:
        counts = np.bincount(np.asarray(self.splits["train"]), minlength=self.vocab_size)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())


@dataclass(frozen=True)
class RemoteFile:
    """A file published at ``url``; ``member`` names the file inside it when it is a zip archive."""

    url: str
    filename: str
    size: int | None = None  # bytes of the downloaded file, when published
    sha256: str | None = None
    mirrors: tuple[str, ...] = ()  # the same file elsewhere (same checksum), tried in order after ``url``

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, *self.mirrors)


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    unit: str
    remote: RemoteFile
    members: dict[str, str]  # split → file in the archive (or "*" for one file split by fractions)
    fractions: tuple[int, int, int] | None = None  # byte counts of train/valid/test for "*"
    expected_tokens: dict[str, int] | None = None  # word corpora: published token counts with <eos>


TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
REGISTRY: dict[str, CorpusSpec] = {
    "tinyshakespeare": CorpusSpec(
        "tinyshakespeare",
        "byte",
        RemoteFile(
            TINYSHAKESPEARE_URL,
            "input.txt",
            size=1_115_394,
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        ),
        {"*": "input.txt"},
    ),
    "enwik8": CorpusSpec(
        "enwik8",
        "byte",
        RemoteFile("http://mattmahoney.net/dc/enwik8.zip", "enwik8.zip"),
        {"*": "enwik8"},
        fractions=(90_000_000, 5_000_000, 5_000_000),
    ),
    "text8": CorpusSpec(
        "text8",
        "byte",
        RemoteFile("http://mattmahoney.net/dc/text8.zip", "text8.zip"),
        {"*": "text8"},
        fractions=(90_000_000, 5_000_000, 5_000_000),
    ),
    "wikitext2": CorpusSpec(
        "wikitext2",
        "word",
        RemoteFile("https://wikitext.smerity.com/wikitext-2-v1.zip", "wikitext-2-v1.zip",
                   mirrors=("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",)),
        {s: f"wikitext-2/wiki.{s}.tokens" for s in SPLITS},
        expected_tokens={"train": 2_088_628, "valid": 217_646, "test": 245_569},
    ),
    "wikitext103": CorpusSpec(
        "wikitext103",
        "word",
        RemoteFile("https://wikitext.smerity.com/wikitext-103-v1.zip", "wikitext-103-v1.zip",
                   mirrors=("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",)),
        {s: f"wikitext-103/wiki.{s}.tokens" for s in SPLITS},
        expected_tokens={"train": 103_227_021, "valid": 217_646, "test": 245_569},
    ),
}
CORPUS_NAMES = ("synthetic", *REGISTRY)


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("SFFN_DATA"):
        return Path(os.environ["SFFN_DATA"]).expanduser()
    return Path.home() / ".cache" / "sffn-lab"


def load_corpus(cfg: DataConfig) -> Corpus:
    """The corpus ``cfg.corpus`` names: "synthetic", a registered name, or a path to a text file."""
    name = cfg.corpus
    parse_tokenizer(cfg.tokenizer)  # a bad spec fails before any download
    if name == "synthetic":
        if cfg.tokenizer:
            raise UserError(f"The synthetic corpus is made of its own symbols: data.tokenizer={cfg.tokenizer} applies "
                            "to text corpora only. Leave data.tokenizer empty.")
        return synthetic_corpus(cfg)
    if name in REGISTRY:
        return named_corpus(REGISTRY[name], cache_root(cfg), cfg.tokenizer)
    if name.startswith(HF_PREFIX):
        return hf_corpus(name, cfg.text_column, cache_root(cfg), cfg.tokenizer)
    path = Path(name).expanduser()
    if path.is_file():
        return text_file_corpus(path, cache_root(cfg), cfg.tokenizer)
    if "/" in name or "." in name:
        raise UserError(f"Corpus file '{name}' does not exist. Give a path to a text file or a corpus name.")
    raise UserError(f"Unknown corpus '{name}'.{did_you_mean(name, CORPUS_NAMES)} Known corpora: "
                    f"{', '.join(CORPUS_NAMES)}, or a file path.")


# --------------------------------------------------------------------------------------------- synthetic


def synthetic_corpus(cfg: DataConfig) -> Corpus:
    s = cfg.synthetic
    sources = synthetic.make_sources(s)
    sizes = {"train": s.train_tokens, "valid": s.valid_tokens, "test": s.test_tokens}
    splits = {split: synthetic.generate_tokens(s, sources, n, stream=i) for i, (split, n) in enumerate(sizes.items())}
    return Corpus("synthetic", "token", SymbolTokenizer(s.vocab_size), splits, synthetic.entropy_rate_bits(s, sources))


# --------------------------------------------------------------------------------------------- bytes


def check_text(data: bytes, source: str) -> None:
    """Refuse empty or binary input: NUL bytes or mostly invalid UTF-8 in the first MiB."""
    if not data:
        raise UserError(f"Corpus '{source}' is empty.")
    head = data[: 1 << 20]
    invalid = len(head) - len(head.decode("utf-8", errors="ignore").encode("utf-8"))
    if b"\x00" in head or invalid > 0.01 * len(head):
        raise UserError(f"Corpus '{source}' looks like a binary file, not text. Give a UTF-8 or ASCII text file.")


def byte_splits(data: np.ndarray, sizes: tuple[int, int, int] | None) -> dict[str, np.ndarray]:
    """Contiguous train/valid/test: the given byte counts, or 90% / 5% / 5%."""
    n = len(data)
    if sizes is None:
        n_valid = n_test = n // 20
        sizes = (n - n_valid - n_test, n_valid, n_test)
    ends = np.cumsum(sizes)
    return {"train": data[: ends[0]], "valid": data[ends[0] : ends[1]], "test": data[ends[1] : ends[2]]}


def text_file_corpus(path: Path, cache: Path, tokenizer_spec: str = "") -> Corpus:
    """Any local text file split 90/5/5 by position: as bytes (memory-mapped, nothing copied), or re-tokenized
    by ``tokenizer_spec`` with its caches in ``cache/files/<file name>``."""
    try:
        with path.open("rb") as f:
            check_text(f.read(1 << 20), str(path))
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as exc:
        raise UserError(f"Cannot read corpus file '{path}': {exc}.") from None
    except ValueError:  # numpy refuses to map an empty file
        raise UserError(f"Corpus '{path}' is empty.") from None
    splits = byte_splits(data, None)
    if tokenizer_spec in ("", "byte"):
        return Corpus(path.name, "byte", ByteTokenizer(), splits, split_bytes={s: len(t) for s, t in splits.items()})
    return retokenized_corpus(path.name, cache / "files" / path.name, splits, tokenizer_spec, cache)


# --------------------------------------------------------------------------------------------- Hugging Face datasets

HF_PREFIX = "hf:"
HF_SPLITS = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}  # ours → theirs


def hf_corpus(spec: str, text_column: str, cache: Path, tokenizer_spec: str = "") -> Corpus:
    """``hf:NAME[:CONFIG]`` through the ``datasets`` library: a folder written by ``save_to_disk``, a local
    folder of data files (parquet, text, json, csv), or a Hub dataset (from its cache when offline). The rows of
    ``text_column``, joined by newlines, are each split's text: the dataset's train / validation / test
    splits when it has all three, else its train split (or only split) cut 90/5/5 by position. As bytes, or
    re-tokenized by ``tokenizer_spec`` with its caches in ``cache/hf/<NAME[_CONFIG]>``."""
    name, _, config = spec[len(HF_PREFIX):].partition(":")
    splits = {ours: data.encode("utf-8") for ours, data in hf_texts(name, config or None, text_column).items()}
    if "valid" not in splits:
        splits = byte_splits(np.frombuffer(splits["train"], dtype=np.uint8), None)
    check_text(bytes(splits["train"][: 1 << 20]), spec)
    if tokenizer_spec in ("", "byte"):
        arrays = {split: np.frombuffer(data, dtype=np.uint8) for split, data in splits.items()}
        return Corpus(spec, "byte", ByteTokenizer(), arrays, split_bytes={s: len(t) for s, t in splits.items()})
    folder = cache / "hf" / "_".join(part.replace("/", "--") for part in (name, config) if part)
    return retokenized_corpus(spec, folder, splits, tokenizer_spec, cache)


def hf_texts(name: str, config: str | None, text_column: str) -> dict[str, str]:
    """split ("train", and "valid" and "test" when the dataset has all three) → the text of its rows."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.corpus=hf:{name} needs the 'datasets' package: pip install 'sffn-lab[hf]'") from None
    try:
        if (Path(name) / datasets.config.DATASETDICT_JSON_FILENAME).is_file() or (
                Path(name) / datasets.config.DATASET_STATE_JSON_FILENAME).is_file():
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, config)
    except (datasets.exceptions.DatasetsError, FileNotFoundError, ConnectionError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"The dataset '{name}'{f' (config {config})' if config else ''} could not be loaded: {reason}. To use it "
            "offline, load it once online (datasets.load_dataset, which fills the cache in HF_HOME), or save it "
            "with Dataset.save_to_disk(DIR) / as parquet or text files in DIR and give data.corpus=hf:DIR."
        ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    chosen = {ours: next((loaded[t] for t in theirs if t in loaded), None) for ours, theirs in HF_SPLITS.items()}
    if chosen["train"] is None:
        if len(loaded) != 1:
            raise UserError(f"The dataset '{name}' has no train split (its splits: {', '.join(loaded)}).")
        chosen["train"] = next(iter(loaded.values()))
    if chosen["valid"] is None or chosen["test"] is None:
        chosen = {"train": chosen["train"]}
    if text_column not in chosen["train"].column_names:
        raise UserError(f"The dataset '{name}' has no column '{text_column}' (its columns: "
                        f"{', '.join(chosen['train'].column_names)}); choose one with data.text_column.")
    return {split: "\n".join(rows[text_column]) for split, rows in chosen.items()}


# --------------------------------------------------------------------------------------------- named corpora


def named_corpus(spec: CorpusSpec, cache: Path, tokenizer_spec: str = "") -> Corpus:
    """A registered corpus in its own unit, or re-tokenized by ``tokenizer_spec``."""
    folder = cache / spec.name
    raw = fetch(spec.remote, folder)
    own_unit = tokenizer_spec in ("", spec.unit)
    if spec.unit == "byte":
        (member,) = spec.members.values()
        data = cached_tokens(folder, "bytes", lambda: np.frombuffer(read_member(raw, member), dtype=np.uint8), raw)
        check_text(bytes(data[: 1 << 20]), str(raw))
        splits = byte_splits(data, spec.fractions)
        if own_unit:
            return Corpus(spec.name, "byte", ByteTokenizer(), splits,
                          split_bytes={s: len(t) for s, t in splits.items()})
        return retokenized_corpus(spec.name, folder, splits, tokenizer_spec, cache)
    if not own_unit:
        texts = {split: read_member(raw, spec.members[split]) for split in SPLITS}
        return retokenized_corpus(spec.name, folder, texts, tokenizer_spec, cache)
    texts = {split: (lambda s=split: read_member(raw, spec.members[s]).decode("utf-8")) for split in SPLITS}
    tokenizer = cached_vocabulary(folder, raw, texts["train"])
    splits = {split: cached_tokens(folder, split, lambda s=split: tokenizer.encode_text(texts[s]()), raw)
              for split in SPLITS}
    for split, expected in (spec.expected_tokens or {}).items():
        if len(splits[split]) != expected:
            raise UserError(
                f"{spec.name} {split} has {len(splits[split]):,} tokens, but the published split has "
                f"{expected:,}: the file '{raw}' is not the expected one. Delete it and download again."
            )
    return Corpus(spec.name, "word", tokenizer, splits,
                  split_bytes={split: member_size(raw, spec.members[split]) for split in SPLITS})


def read_member(path: Path, member: str) -> bytes:
    """The bytes of ``member`` from a zip archive, or of the file itself when it is not a zip."""
    if not zipfile.is_zipfile(path):
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(member)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"Archive '{path}' is corrupt or lacks '{member}' ({exc}). Delete it and retry.") from None


def member_size(path: Path, member: str) -> int:
    """The size in bytes of ``member`` of a zip archive (read from its directory), or of the file itself."""
    if not zipfile.is_zipfile(path):
        return path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        return archive.getinfo(member).file_size


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(remote: RemoteFile, path: Path) -> None:
    """Check size and sha256 (published, or recorded at the first verified use) of a cached file."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        raise UserError(
            f"'{path}' has {size:,} bytes but {remote.url} has {remote.size:,}: the file is truncated or "
            "not the right one. Delete it; sffn will download it again."
        )
    recorded = path.with_name(path.name + ".sha256")
    expected = remote.sha256 or (recorded.read_text().strip() if recorded.is_file() else None)
    actual = sha256_of(path)
    if expected is not None and actual != expected:
        raise UserError(
            f"Checksum mismatch for '{path}': sha256 {actual}, expected {expected}. The file is corrupt; "
            f"delete it and download {remote.url} again."
        )
    if not recorded.is_file():
        write_atomically(recorded, actual.encode())


def downloadable(name: str) -> CorpusSpec:
    """The registered corpus ``name``; a clear error for any other name."""
    if name == "synthetic":
        raise UserError("The synthetic corpus is generated from data.synthetic.seed: there is nothing to download.")
    if name not in REGISTRY:
        raise UserError(f"Unknown corpus '{name}'.{did_you_mean(name, REGISTRY)} Corpora to download: "
                        f"{', '.join(REGISTRY)}.")
    return REGISTRY[name]


def download_corpus(name: str, cache: Path) -> tuple[Path, bool]:
    """Put the named corpus' file in ``cache`` as training would fetch it (same addresses, mirrors, size and
    checksum), for a node without network later → (the verified file, whether it was already there)."""
    spec = downloadable(name)
    path = cache / spec.name / spec.remote.filename
    was_there = path.is_file()
    fetch(spec.remote, path.parent)
    return path, was_there


def fetch(remote: RemoteFile, folder: Path) -> Path:
    """The verified local copy of ``remote`` in ``folder``, downloading it first if needed."""
    path = folder / remote.filename
    if not path.is_file():
        download(remote, path)
    verify(remote, path)
    return path


USER_AGENT = "sffn-lab/0.1 (research toolkit; python-urllib)"
RETRY_DELAYS_S = (2.0, 8.0)  # waits before the 2nd and 3rd try of one address


def download(remote: RemoteFile, path: Path, timeout: float = 30.0) -> None:
    """Fetch ``remote`` into ``path`` (atomically): each address in turn, each tried up to 3 times with
    backoff; a client error (HTTP 4xx) moves on to the next address at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in remote.urls:
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S)):
            time.sleep(delay)
            try:
                data = _fetch_bytes(url, timeout)
            except urllib.error.HTTPError as exc:
                failures.append(f"{url}: HTTP {exc.code}")
                if 400 <= exc.code < 500:
                    break
                continue
            except OSError as exc:
                failures.append(f"{url} (try {attempt + 1}): {getattr(exc, 'reason', exc)}")
                continue
            if remote.size is not None and len(data) != remote.size:
                incomplete = f"{len(data):,} of {remote.size:,} bytes"
                failures.append(f"{url}: incomplete ({incomplete})")
                continue
            write_atomically(path, data)
            return
    if all("incomplete" in f for f in failures):
        raise UserError(f"Download of {remote.url} is incomplete ({incomplete}). Retry.")
    raise UserError(
        f"Could not download {remote.url} ({'; '.join(failures[-3:])}). Without network access, download the "
        f"file elsewhere and place it at '{path}' (or set $SFFN_DATA / data.cache_dir to a folder holding "
        f"'{path.parent.name}/{path.name}')."
    )


def _fetch_bytes(url: str, timeout: float) -> bytes:
    """The body at ``url``, with a progress bar when standard error is a terminal."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        chunks = []
        with Progress(TextColumn("downloading {task.description}"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), transient=True, disable=not sys.stderr.isatty(),
                      console=Console(stderr=True)) as progress:
            task = progress.add_task(url.rsplit("/", 1)[-1], total=total)
            while chunk := response.read(1 << 20):
                chunks.append(chunk)
                progress.advance(task, len(chunk))
    return b"".join(chunks)


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_tokens(folder: Path, key: str, make: Callable[[], np.ndarray], source: Path) -> np.ndarray:
    """A token array stored as .npy next to its source and memory-mapped; rebuilt when the source changes."""
    stat = source.stat()
    return cached_array(folder / f"{key}.{stat.st_size}-{int(stat.st_mtime)}.npy", make)


def cached_array(path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
    """``make()`` saved once at ``path`` (.npy, written atomically), memory-mapped from there."""
    if not path.is_file():
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(make()))
        write_atomically(path, buffer.getvalue())
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, EOFError) as exc:
        path.unlink(missing_ok=True)
        raise UserError(f"Cached tokens '{path}' were corrupt ({exc}) and have been removed; run again.") from None


def cached_vocabulary(folder: Path, source: Path, train_text: Callable[[], str]) -> WordTokenizer:
    stat = source.stat()
    path = folder / f"vocab.{stat.st_size}-{int(stat.st_mtime)}.json"
    if path.is_file():
        try:
            return WordTokenizer(json.loads(path.read_text()))
        except ValueError:  # not JSON, or not UTF-8: rebuild it
            path.unlink()
    tokenizer = WordTokenizer.from_text(train_text())
    write_atomically(path, json.dumps(tokenizer.words).encode())
    return tokenizer


# --------------------------------------------------------------------------------------------- re-tokenized text


def retokenized_corpus(name: str, folder: Path, texts: dict[str, np.ndarray | bytes], tokenizer_spec: str,
                       cache: Path) -> Corpus:
    """The UTF-8 ``texts`` of the splits (raw bytes) as tokens of ``tokenizer_spec``, cached in ``folder``.

    The sha256 of the training split keys the trained tokenizer; the token arrays are keyed by it and by the
    sha256 of their own split. A split that cuts a character in two decodes it as U+FFFD; ``split_bytes``
    counts the original bytes either way.
    """
    kind, vocab_size = parse_tokenizer(tokenizer_spec)
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {split: hashlib.sha256(texts[split]).hexdigest()[:16] for split in SPLITS}
    key = f"{tokenizer_spec.replace(':', '')}-{checksums['train']}"

    def text(split: str) -> str:
        return bytes(texts[split]).decode("utf-8", errors="replace")

    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "gpt2":
        tokenizer = gpt2_tokenizer(cache)
    else:
        tokenizer = cached_tokenizer(folder / f"tokenizer.{key}.json",
                                     lambda: train_tokenizer(kind, vocab_size, text("train")))
    splits = {split: cached_array(folder / f"{split}.{key}-{checksums[split]}.npy",
                                  lambda s=split: tokenizer.encode_text(text(s)))
              for split in SPLITS}
    unit = kind if kind in ("byte", "word") else "token"
    return Corpus(name, unit, tokenizer, splits, split_bytes={split: len(texts[split]) for split in SPLITS})


def train_tokenizer(kind: str, vocab_size: int, train_text: str) -> Tokenizer:
    """A ``kind`` tokenizer ("word", "sentencepiece" or "bpe") learned from the training split's text."""
    if kind == "word":
        return WordTokenizer.from_text(train_text)
    if kind == "sentencepiece":
        return SentencePieceTokenizer.train(train_text, vocab_size)
    return ByteLevelBPETokenizer.train(train_text, vocab_size)


def cached_tokenizer(path: Path, train: Callable[[], Tokenizer]) -> Tokenizer:
    """The tokenizer saved at ``path`` (as ``tokenizer_to_dict``), else ``train()``ed and saved there."""
    if path.is_file():
        try:
            return tokenizer_from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError):  # not JSON, not UTF-8 or not a tokenizer: train it again
            path.unlink()
    tokenizer = train()
    write_atomically(path, json.dumps(tokenizer_to_dict(tokenizer)).encode())
    return tokenizer


GPT2_REMOTES = tuple(RemoteFile(GPT2_URL + name, name, sha256=sha256) for name, sha256 in GPT2_FILES.items())


def gpt2_tokenizer(cache: Path) -> GPT2Tokenizer:
    """GPT-2's BPE from OpenAI's files in ``cache/gpt2``, downloaded (and verified) there the first time."""
    folder = cache / "gpt2"
    try:
        for remote in GPT2_REMOTES:
            fetch(remote, folder)
    except UserError as exc:
        raise UserError(f"{gpt2_files_help(folder)}\n({exc})") from None
    return GPT2Tokenizer(folder)
