"""``Cost``: parameters and forward FLOPs per token of one FFN layer or of a whole model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    """Of one FFN layer or of a whole model."""

    total_params: int
    active_params: int  # parameters touched by one token (embedding: one row; experts: the selected ones)
    flops_per_token: int  # forward, a multiply-add counted as 2
