"""Tokenizers: bytes, words with ``<eos>`` per line, the synthetic corpus' symbols, and (from ``subword``)
SentencePiece, byte-level BPE and GPT-2.

Each one saves itself as a small JSON-able dict (``tokenizer_to_dict`` / ``tokenizer_from_dict``), which
a run directory keeps as ``tokenizer.json`` so that ``sffn sample`` needs no corpus.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from typing import Protocol

import numpy as np

from sffn_lab.data.subword import ByteLevelBPETokenizer, GPT2Tokenizer, SentencePieceTokenizer

EOS, UNK = "<eos>", "<unk>"


class UnencodableText(ValueError):
    """Text with characters the tokenizer has no token for (``characters`` lists them once each)."""

    def __init__(self, characters: list[str], vocabulary: str):
        super().__init__(f"no token for {', '.join(map(repr, characters))}; the vocabulary is {vocabulary!r}")
        self.characters = characters


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def encode_text(self, text: str) -> np.ndarray:
        """A whole split → uint8 ids [n] (its UTF-8 bytes)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class SymbolTokenizer:
    """The synthetic corpus: token 0 is the document separator ("|"), the rest printable symbols."""

    ALPHABET = "|" + "".join(chr(c) for c in range(ord("A"), ord("Z") + 1)) + "abcdefghijklmnopqrstuvwxyz0123456789"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.symbols = self.ALPHABET[:vocab_size] if vocab_size <= len(self.ALPHABET) else None

    def encode(self, text: str) -> list[int]:
        if self.symbols is None:
            return [int(t) for t in text.split()]
        unknown = [c for c in dict.fromkeys(text) if c not in self.symbols]
        if unknown:
            raise UnencodableText(unknown, self.symbols)
        return [self.symbols.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        if self.symbols is None:
            return " ".join(map(str, ids))
        return "".join(self.symbols[i] for i in ids)


class WordTokenizer:
    """Whitespace words, ``<eos>`` at the end of every line; words unseen in training map to ``<unk>``."""

    def __init__(self, words: list[str]):
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.vocab_size = len(words)

    @classmethod
    def from_text(cls, text: str) -> WordTokenizer:
        """Vocabulary of a training text, most frequent first (ties in order of appearance)."""
        counts = Counter(w for line in text.splitlines() for w in [*line.split(), EOS])
        counts.setdefault(UNK, 0)
        return cls([w for w, _ in counts.most_common()])

    def encode_text(self, text: str) -> np.ndarray:
        """All lines of a text → int32 token array."""
        unk = self.index[UNK]
        ids = [self.index.get(w, unk) for line in text.splitlines() for w in [*line.split(), EOS]]
        return np.asarray(ids, dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        unk = self.index[UNK]
        return [self.index.get(w, unk) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids).replace(f" {EOS} ", "\n").replace(EOS, "\n")


def tokenizer_to_dict(tokenizer: Tokenizer) -> dict:
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte"}
    if isinstance(tokenizer, SymbolTokenizer):
        return {"kind": "symbol", "vocab_size": tokenizer.vocab_size}
    if isinstance(tokenizer, WordTokenizer):
        return {"kind": "word", "words": tokenizer.words}
    if isinstance(tokenizer, SentencePieceTokenizer):
        return {"kind": "sentencepiece", "model": base64.b64encode(tokenizer.model).decode("ascii")}
    if isinstance(tokenizer, ByteLevelBPETokenizer):
        return {"kind": "bpe", "model": json.loads(tokenizer.model)}
    if isinstance(tokenizer, GPT2Tokenizer):  # OpenAI's files stay in the data cache
        return {"kind": "gpt2", "folder": str(tokenizer.folder)}
    raise TypeError(f"cannot save a {type(tokenizer).__name__}")


def tokenizer_from_dict(data: dict) -> Tokenizer:
    if data["kind"] == "byte":
        return ByteTokenizer()
    if data["kind"] == "symbol":
        return SymbolTokenizer(data["vocab_size"])
    if data["kind"] == "word":
        return WordTokenizer(data["words"])
    if data["kind"] == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(data["model"]))
    if data["kind"] == "bpe":
        return ByteLevelBPETokenizer(json.dumps(data["model"]))
    if data["kind"] == "gpt2":
        return GPT2Tokenizer(Path(data["folder"]))
    raise ValueError(f"unknown tokenizer kind {data['kind']!r}")
