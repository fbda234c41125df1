"""Subword tokenizers: a SentencePiece BPE model and a byte-level BPE, both trained on a training text, and
the published GPT-2 BPE.

All three decode what they encode: ``decode(encode(text)) == text`` for any text (SentencePiece falls back to
bytes for characters it has no piece for). A trained model keeps its serialized form (``model``), which
``tokenizers.tokenizer_to_dict`` stores in a run directory; GPT-2 is read from OpenAI's two files in a folder.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece
import tiktoken
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from sffn_lab.errors import UserError

# A newline between two non-space characters: no tokenizer here puts the characters on its two sides into one
# token, so a long text can be encoded piece by piece, cut there, with the ids of encoding it at once.
PIECE_BOUNDARY = re.compile(r"(?<=\S\n)(?=\S)")


def text_pieces(text: str, chars: int = 1 << 20) -> Iterator[str]:
    """``text`` cut at ``PIECE_BOUNDARY`` into pieces of about ``chars`` characters (bounded memory for big splits)."""
    start = 0
    while start < len(text):
        boundary = PIECE_BOUNDARY.search(text, start + chars)
        end = boundary.start() if boundary else len(text)
        yield text[start:end]
        start = end


def encode_in_pieces(encode: Callable[[str], list[int]], text: str, chars: int = 1 << 20) -> np.ndarray:
    """int32 ids [n] of ``text``, encoded piece by piece (the same ids as ``encode(text)``)."""
    ids = [np.asarray(encode(piece), dtype=np.int32) for piece in text_pieces(text, chars)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)


class SplitEncoder:
    """What the three tokenizers share: a whole split encoded piece by piece with their own ``encode``."""

    def encode_text(self, text: str) -> np.ndarray:
        """A whole split → int32 ids [n]."""
        return encode_in_pieces(self.encode, text)


MAX_SENTENCE_CHARS = 4096


def training_sentences(text: str) -> Iterator[str]:
    """SentencePiece's training sentences: the lines of ``text``, long ones cut before a space into pieces of at
    most ``MAX_SENTENCE_CHARS`` characters (text8 is a single line)."""
    for line in text.split("\n"):
        while len(line) > MAX_SENTENCE_CHARS:
            cut = line.rfind(" ", 1, MAX_SENTENCE_CHARS)
            cut = cut if cut > 0 else MAX_SENTENCE_CHARS
            yield line[:cut]
            line = line[cut:]
        yield line


class SentencePieceTokenizer(SplitEncoder):
    """A SentencePiece BPE model with digits split, as the σ-MoE authors train theirs (model_type "bpe",
    split_digits); unlike theirs, no normalisation (their NFKC would change the text and so its bytes), every
    character of the training text a piece, bytes for the rest, "\\n" a piece of its own. ``model`` is the
    serialized model proto."""

    # SentencePiece writes spaces as this character, so a literal one in the text is encoded as its UTF-8 bytes.
    SPACE_SYMBOL = "\u2581"

    def __init__(self, model: bytes):
        self.model = model
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model)
        self.vocab_size = self.processor.get_piece_size()
        self.space_symbol_ids = [self.processor.piece_to_id(f"<0x{b:02X}>") for b in self.SPACE_SYMBOL.encode()]

    @classmethod
    def train(cls, text: str, vocab_size: int) -> SentencePieceTokenizer:
        """Train ``vocab_size`` pieces on ``text`` (seconds for a few MB)."""
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=training_sentences(text), model_writer=model, vocab_size=vocab_size,
                model_type="bpe", split_digits=True, character_coverage=1.0, byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
                user_defined_symbols=["\n"], unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                max_sentence_length=4 * MAX_SENTENCE_CHARS, num_threads=os.cpu_count() or 1, minloglevel=2,
            )
        except RuntimeError as exc:
            reason = str(exc).rsplit("] ", 1)[-1].rstrip(".")  # without the C++ source location
            raise UserError(f"SentencePiece cannot train {vocab_size:,} pieces on this text: {reason}. Choose another "
                            "size in data.tokenizer=sentencepiece:<size>.") from None
        return cls(model.getvalue())

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(text.split(self.SPACE_SYMBOL)):
            if i:
                ids += self.space_symbol_ids
            ids += self.processor.encode(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


class ByteLevelBPETokenizer(SplitEncoder):
    """Byte-level BPE (HuggingFace ``tokenizers``): GPT-2's pre-tokenization, merges learned on a training text
    on top of the 256 bytes. ``model`` is the tokenizer's JSON."""

    def __init__(self, model: str):
        self.model = model
        self.tokenizer = HFTokenizer.from_str(model)
        self.vocab_size = self.tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> ByteLevelBPETokenizer:
        """Learn merges on ``text`` until ``vocab_size`` tokens (fewer when the text has no more pairs to merge)."""
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tokenizer.train_from_iterator(text_pieces(text), trainer)
        return cls(tokenizer.to_str())

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {  # file → sha256, as tiktoken pins them (tiktoken_ext/openai_public.py)
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def gpt2_files_help(folder: Path) -> str:
    """Where GPT-2's encoding comes from and where sffn looks for it."""
    return (f"GPT-2's tokenizer needs the files {' and '.join(GPT2_FILES)} published at {GPT2_URL}. Without network "
            f"access, download them elsewhere and place both in '{folder}'.")


class GPT2Tokenizer(SplitEncoder):
    """The published GPT-2 BPE (50,257 tokens) through tiktoken, built from OpenAI's ``vocab.bpe`` (merges) and
    ``encoder.json`` (token ids) in ``folder``. Text is encoded as ordinary text: "<|endoftext|>" in it is not the
    special token."""

    def __init__(self, folder: Path):
        self.folder = folder
        paths = [folder / name for name in GPT2_FILES]
        if not all(path.is_file() for path in paths):
            raise UserError(gpt2_files_help(folder))
        ranks, special = data_gym_ranks(*(path.read_text(encoding="utf-8") for path in paths))
        self.encoding = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens=special)
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


def data_gym_bytes() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte in its files: a printable byte other than the space stands for
    itself, the others in order for chr(256), chr(257), …"""
    kept = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(others)}


def data_gym_ranks(vocab_bpe: str, encoder_json: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """(token bytes → rank, special token → id) from the texts of GPT-2's ``vocab.bpe`` and ``encoder.json``.

    The ranks are the 256 bytes (printable ones first, as GPT-2 numbers them), then one token per merge in the
    order of ``vocab.bpe``; ``encoder.json`` must give every token the same id.
    """
    stand_ins = data_gym_bytes()

    def to_bytes(token: str) -> bytes:
        return bytes(stand_ins[c] for c in token)

    ranks = {bytes([b]): i for i, b in enumerate(stand_ins.values())}
    merges = [line.split() for line in vocab_bpe.split("\n")[1:] if line]  # the first line is "#version: 0.2"
    for rank, (first, second) in enumerate(merges, start=len(ranks)):
        ranks[to_bytes(first) + to_bytes(second)] = rank
    encoder = json.loads(encoder_json)
    special = {ENDOFTEXT: encoder.pop(ENDOFTEXT, len(ranks))}
    if {to_bytes(token): i for token, i in encoder.items()} != ranks:
        raise UserError("GPT-2's vocab.bpe and encoder.json do not describe the same tokens: the files are not the "
                        f"published pair. Delete them and download both from {GPT2_URL} again.")
    return ranks, special
