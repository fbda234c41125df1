"""Durations as people read them: ``4.2 s``, ``42 s``, ``12 min 5 s``, ``1 h 57 min``, ``3 d 4 h``."""

from __future__ import annotations

import math

UNITS = (("d", 86_400), ("h", 3600), ("min", 60), ("s", 1))


def format_duration(seconds: float) -> str:
    """A duration in its two largest units (under 10 s: seconds to a tenth); ``?`` when not known (NaN)."""
    if math.isnan(seconds):
        return "?"
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    i = next(i for i, (_, size) in enumerate(UNITS) if whole >= size)  # d, h or min
    (big, size), (small, small_size) = UNITS[i], UNITS[i + 1]
    count, rest = divmod(round(whole / small_size) * small_size, size)
    rest //= small_size
    return f"{count} {big} {rest} {small}" if rest else f"{count} {big}"
