"""The LightningDataModule for every corpus: random training windows, exact evaluation windows.

Training: the batch of optimizer step s is a pure function of (seed, s): ``batch_size`` random
windows (the global batch); with W processes, rank r takes the r-th of W equal slices. Resuming
at step s therefore continues with exactly the data an uninterrupted run would see, and W ranks
see together what one process sees. Evaluation: non-overlapping windows in which every token of
the split except the first is a target exactly once (the last window is padded, its padding is
ignored); with W processes, rank r evaluates windows r, r+W, ... (no duplicates). ``eval.stride``
slides the windows instead, each scoring only its last ``stride`` targets.

A model with memory (Transformer-XL) reads streams instead: row r of every training batch continues the
r-th contiguous stretch of the training split, segment after segment (still a pure function of the step);
evaluation walks each split as contiguous streams in order, every token scored once.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sffn_lab.config import Config, DataConfig
from sffn_lab.data.corpora import Corpus, load_corpus
from sffn_lab.errors import UserError

IGNORE_INDEX = -100


class TrainWindows(IterableDataset):
    """Yields (x [b, S], y [b, S]) int64 batches for steps start_step, start_step + 1, ..."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, start_step: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.start_step, self.rank, self.world_size = seed, start_step, rank, world_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        per_rank = self.batch_size // self.world_size
        starts = starts[self.rank * per_rank : (self.rank + 1) * per_rank]
        windows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


class TrainStreams(TrainWindows):
    """For a model with memory: row r of the global batch reads the r-th of ``batch_size`` contiguous stretches
    of the split, L = ⌊(N − 1) / batch_size⌋ tokens each, one segment per step: at step s the inputs
    tokens[r·L + (s mod n)·S : … + S], n = ⌊L / S⌋ whole segments, after which the stretch starts over."""

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        stretch = (len(self.tokens) - 1) // self.batch_size
        offset = (step % (stretch // self.seq_len)) * self.seq_len
        per_rank = self.batch_size // self.world_size
        rows = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        start = [r * stretch + offset for r in rows]
        windows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in start])
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]


class EvalWindows(Dataset):
    """Window k: inputs tokens[kT : kT + S], targets the next S tokens (padded with IGNORE_INDEX at the end),
    T = ``stride`` (default S: non-overlapping). Window 0 scores all its targets, every later one only its
    last T: every target is scored once, each but the first S with at least S − T tokens of context."""

    def __init__(self, tokens: np.ndarray, seq_len: int, rank: int = 0, world_size: int = 1, stride: int = 0):
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride or seq_len
        n_windows = 1 + max(0, -(-(len(tokens) - 1 - seq_len) // self.stride))
        self.windows = list(range(rank, n_windows, world_size))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, S = self.windows[i], self.seq_len
        start = k * self.stride
        chunk = np.asarray(self.tokens[start : start + S + 1], dtype=np.int64)
        x = torch.zeros(S, dtype=torch.long)
        y = torch.full((S,), IGNORE_INDEX, dtype=torch.long)
        x[: len(chunk) - 1] = torch.from_numpy(chunk[:-1])
        y[: len(chunk) - 1] = torch.from_numpy(chunk[1:])
        if k > 0:
            y[: S - self.stride] = IGNORE_INDEX  # scored by an earlier window
        return x, y


class EvalStreams(Dataset):
    """For a model with memory: the N − 1 targets of a split cut into ``n_streams`` contiguous streams (at
    least one per process), each walked segment by segment; item k is segment k of this rank's streams,
    (x [b, S], y [b, S]), padded with IGNORE_INDEX where a stream has ended. Rank r takes streams r, r+W, …"""

    def __init__(self, tokens: np.ndarray, seq_len: int, n_streams: int, rank: int = 0, world_size: int = 1):
        self.tokens, self.seq_len = tokens, seq_len
        n_targets = len(tokens) - 1
        n_streams = max(world_size, min(n_streams, -(-n_targets // seq_len)))
        self.length = -(-n_targets // n_streams)  # targets per stream (the last streams may have fewer)
        self.n_targets = n_targets
        self.streams = list(range(rank, n_streams, world_size))

    def __len__(self) -> int:
        return -(-self.length // self.seq_len)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.seq_len
        x = torch.zeros(len(self.streams), S, dtype=torch.long)
        y = torch.full((len(self.streams), S), IGNORE_INDEX, dtype=torch.long)
        for row, b in enumerate(self.streams):
            first = b * self.length + 1 + k * S  # the first target of this segment
            last = min((b + 1) * self.length, self.n_targets, first + S - 1)
            if last < first:
                continue
            chunk = torch.from_numpy(np.asarray(self.tokens[first - 1 : last + 1], dtype=np.int64))
            x[row, : len(chunk) - 1] = chunk[:-1]
            y[row, : len(chunk) - 1] = chunk[1:]
        return x, y


class LMDataModule(L.LightningDataModule):
    """Loads ``cfg.corpus`` at construction, so vocabulary and unit are known before the model is built."""

    def __init__(self, cfg: DataConfig, seed: int, streams: bool = False, eval_stride: int = 0):
        """``streams``: read contiguous streams for a model with memory; ``eval_stride``: sliding evaluation
        windows (0: non-overlapping)."""
        super().__init__()
        self.cfg, self.seed, self.streams, self.eval_stride = cfg, seed, streams, eval_stride
        self.corpus: Corpus = load_corpus(cfg)
        for split, tokens in self.corpus.splits.items():
            if len(tokens) < cfg.seq_len + 1:
                raise UserError(
                    f"The {split} split of '{cfg.corpus}' has {len(tokens):,} tokens, fewer than one window of "
                    f"data.seq_len + 1 = {cfg.seq_len + 1}. Use a longer corpus or a shorter data.seq_len."
                )
        if streams and (len(self.corpus.splits["train"]) - 1) // cfg.batch_size < cfg.seq_len:
            raise UserError(
                f"A model with memory reads the training split as data.batch_size = {cfg.batch_size} contiguous "
                f"streams of at least data.seq_len = {cfg.seq_len} tokens; the split has only "
                f"{len(self.corpus.splits['train']):,}. Use a smaller batch, a shorter window or a longer corpus."
            )
        self.unigram_entropy_bits = self.corpus.unigram_entropy_bits()

    @classmethod
    def of(cls, config: Config) -> LMDataModule:
        """The data module a run of ``config`` trains and evaluates on (streams for a model with memory)."""
        return cls(config.data, seed=config.train.seed, streams=config.model.memory_segments > 0,
                   eval_stride=config.eval.stride)

    vocab_size = property(lambda self: self.corpus.vocab_size)
    unit = property(lambda self: self.corpus.unit)
    entropy_rate_bits = property(lambda self: self.corpus.entropy_rate_bits)

    def encode(self, text: str) -> list[int]:
        return self.corpus.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.corpus.tokenizer.decode(ids)

    def split_tokens(self, split: str) -> np.ndarray:
        return self.corpus.splits[split]

    def _placement(self) -> tuple[int, int, int]:
        """(start step, rank, world size) from the attached trainer, or a fresh single process."""
        if self.trainer is None:
            return 0, 0, 1
        return self.trainer.global_step, self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        step, rank, world = self._placement()
        if self.cfg.batch_size % world:
            raise UserError(f"data.batch_size ({self.cfg.batch_size}) is the global batch; it must be divisible "
                            f"by the number of processes ({world}).")
        kind = TrainStreams if self.streams else TrainWindows
        windows = kind(self.corpus.splits["train"], self.cfg.seq_len, self.cfg.batch_size, self.seed, step, rank, world)
        return self._loader(windows, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("valid")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def eval_dataloader(self, split: str) -> DataLoader:
        _, rank, world = self._placement()
        tokens = self.corpus.splits[split]
        if self.streams:
            return self._loader(EvalStreams(tokens, self.cfg.seq_len, self.cfg.eval_batch_size, rank, world), None)
        windows = EvalWindows(tokens, self.cfg.seq_len, rank, world, self.eval_stride)
        return self._loader(windows, batch_size=self.cfg.eval_batch_size)

    def _loader(self, dataset, batch_size: int | None) -> DataLoader:
        # A private generator: iterating a loader never draws from the global torch RNG, which
        # keeps dropout masks identical between a resumed and an uninterrupted run.
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.cfg.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))
