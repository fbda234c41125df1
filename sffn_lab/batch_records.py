"""Training batches recorded on the device and settled on the host later.

A training step records its batch (step, tokens, loss, whether the loss was finite on every rank) without
reading anything from the device; the host reads the records in one sync where it needs the counts
(``LanguageModelModule.settle_batches``). The AND of the flags of an optimizer step's batches (several under
gradient accumulation) decides on the device whether that step is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BatchRecord:
    """A training batch as the host settles it later: its step, its input tokens (all ranks), its loss and
    whether the loss was finite on every rank (0-dim device tensors, not read when recorded)."""

    step: int
    tokens: int
    loss: torch.Tensor
    finite: torch.Tensor


@dataclass
class Unsettled:
    """The training batches recorded since the host last read them, and the AND of the finite flags of the
    batches of the optimizer step under way (gradient accumulation: one flag for several batches)."""

    batches: list[BatchRecord] = field(default_factory=list)
    step_finite: torch.Tensor | None = None

    def record(self, batch: BatchRecord) -> None:
        self.batches.append(batch)
        self.step_finite = batch.finite if self.step_finite is None else self.step_finite & batch.finite

    def take_step_flag(self) -> torch.Tensor | None:
        """The optimizer step's flag (None before any batch), forgotten for the next step."""
        flag, self.step_finite = self.step_finite, None
        return flag

    def read(self) -> list[tuple[BatchRecord, float, bool]]:
        """(batch, loss, finite on every rank) of every recorded batch, read with one host sync; forgets them."""
        batches, self.batches = self.batches, []
        if not batches:
            return []
        values = torch.cat([torch.stack([b.loss.double() for b in batches]),
                            torch.stack([b.finite.double() for b in batches])]).tolist()
        n = len(batches)
        return [(b, loss, ok == 1.0) for b, loss, ok in zip(batches, values[:n], values[n:], strict=True)]
