"""One layer's routing sorted by expert: built once per layer, read by both expert products.

Every tensor lives on the device of the routing indices, and building a plan never waits for the
device: on CUDA the host learns the per-expert offsets only where a path asks for them
(``host_offsets``: the PyTorch path's per-expert blocks and split fallback), once per plan.

What the products derive from a plan (tile tables, the sorted-row index, the host offsets) is cached on it, so
the layer's two products and their backward passes derive it once. Under ``torch.compile`` the plan crosses
each custom op's boundary as tensors (``tensors`` / ``from_tensors``): the derived tensors a backend reads
(``PlanReads``) go with it, computed once in the compiled graph rather than again in each of the four ops.

Shapes: T tokens, K experts per token, P = T·K (token, k) pairs, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import torch


def counts_per_id(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0 … n − 1 occurs in ``ids`` (long [n]). A scatter rather than ``bincount``, whose
    output shape depends on the data: this one's is fixed by n, so ``torch.compile`` traces it."""
    flat = ids.reshape(-1)
    return torch.zeros(n, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


@dataclass
class Tiles:
    """Row tiles of at most ``height`` sorted pairs that never straddle two experts.

    ``table`` long [3, n]: tile i covers the sorted rows start[i] : min(start[i] + height, end[i]) of
    expert[i] (rows 0, 1, 2 of the table: expert, start, end); end[i] is the end of that expert's rows, so
    start < end only for real tiles. n = ⌈P / height⌉ + E is an upper bound fixed by the shapes alone, so a
    kernel grid of n programs needs no host sync; programs past the last real tile find start ≥ end and
    exit. An expert's tiles are consecutive: ``first`` long [E + 1], expert e's tiles are
    first[e] : first[e + 1] (none for an expert without rows).
    """

    height: int
    table: torch.Tensor
    first: torch.Tensor

    def __len__(self) -> int:
        return self.table.shape[1]


@dataclass(frozen=True)
class PlanReads:
    """What a backend's products read of a plan beyond its own tensors: the row tiles of these heights (and
    the sorted-row index that goes with them), and the offsets on the host."""

    tile_heights: tuple[int, ...] = ()
    host_offsets: bool = False


@dataclass
class RoutingPlan:
    """indices [T, K] (long) sorted by expert: ``pairs`` [P] flat pair ids p = t·K + k in expert order
    (stable), ``tokens`` [P] = pairs // K, ``counts`` [E] pairs per expert, ``offsets`` [E + 1]
    (offsets[e] : offsets[e + 1] are expert e's sorted rows)."""

    indices: torch.Tensor
    pairs: torch.Tensor
    tokens: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    _host_offsets: list[int] | None = field(default=None, repr=False)
    _host_copy: torch.Tensor | None = field(default=None, repr=False)
    _sorted_rows: torch.Tensor | None = field(default=None, repr=False)
    _tiles: dict[int, Tiles] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, indices: torch.Tensor, n_experts: int) -> RoutingPlan:
        if indices.dim() != 2:
            raise ValueError(f"indices must be [T, K], got shape {tuple(indices.shape)}")
        flat = indices.reshape(-1)
        pairs = torch.argsort(flat, stable=True)
        counts = counts_per_id(flat, n_experts)
        offsets = torch.zeros(n_experts + 1, dtype=torch.long, device=flat.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(indices, pairs, pairs // indices.shape[1], counts, offsets)

    def tensors(self, reads: PlanReads = PlanReads()) -> list[torch.Tensor]:
        """The plan as the custom ops take it: indices, pairs, tokens, counts, offsets, then what ``reads`` names,
        derived here once (cached): each tile height's table and first, the sorted-row index (with any tiles),
        the offsets copied to the host (a device sync on CUDA; the op reads them without one)."""
        out = [self.indices, self.pairs, self.tokens, self.counts, self.offsets]
        for height in reads.tile_heights:
            out += [self.tiles(height).table, self.tiles(height).first]
        if reads.tile_heights:
            out.append(self.sorted_rows())
        if reads.host_offsets:
            if self._host_copy is None:
                self._host_copy = self.offsets.cpu()
            out.append(self._host_copy)
        return out

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], reads: PlanReads) -> RoutingPlan:
        """The plan ``tensors(reads)`` gave, with what it derived in place (nothing derived again)."""
        plan, rest = cls(*tensors[:5]), iter(tensors[5:])
        for height in reads.tile_heights:
            plan._tiles[height] = Tiles(height, next(rest), next(rest))
        if reads.tile_heights:
            plan._sorted_rows = next(rest)
        if reads.host_offsets:
            plan._host_offsets = next(rest).tolist()  # a host tensor: no sync
        return plan

    @property
    def n_experts(self) -> int:
        return self.counts.shape[0]

    def host_offsets(self) -> list[int]:
        """``offsets`` as Python ints [E + 1] (one device sync on CUDA, made once per plan)."""
        if self._host_offsets is None:
            self._host_offsets = self.offsets.tolist()
        return self._host_offsets

    def host_counts(self) -> list[int]:
        """Pairs per expert as Python ints [E] (from ``host_offsets``)."""
        ends = self.host_offsets()
        return [b - a for a, b in pairwise(ends)]

    def sorted_rows(self) -> torch.Tensor:
        """0 … P − 1 (long [P]): the row index of a per-pair tensor already in expert order (built once)."""
        if self._sorted_rows is None:
            self._sorted_rows = torch.arange(self.pairs.shape[0], device=self.pairs.device)
        return self._sorted_rows

    def group_ends(self) -> torch.Tensor:
        """offsets[1:] as int32 [E]: the ``offs`` of ``torch._grouped_mm``."""
        return self.offsets[1:].to(torch.int32)

    def tiles(self, height: int) -> Tiles:
        """The row tiles of ``height`` rows (computed once per plan and tile height)."""
        if height not in self._tiles:
            self._tiles[height] = self._make_tiles(height)
        return self._tiles[height]

    def _make_tiles(self, height: int) -> Tiles:
        E = self.n_experts
        P = self.pairs.shape[0]
        device = self.counts.device
        per_expert = (self.counts + height - 1) // height  # tiles of each expert [E]
        first = torch.zeros(E + 1, dtype=torch.long, device=device)
        first[1:] = torch.cumsum(per_expert, 0)
        tile = torch.arange(-(-P // height) + E, device=device)
        expert = torch.searchsorted(first[1:], tile, right=True).clamp_max(E - 1)
        within = tile - first[expert]
        end = self.offsets[expert + 1]
        start = torch.minimum(self.offsets[expert] + within * height, end)  # past the last tile: start = end
        return Tiles(height, torch.stack([expert, start, end]), first)
