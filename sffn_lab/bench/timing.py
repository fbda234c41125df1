"""Wall-clock medians of several variants, run interleaved so that machine load hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    variants: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median seconds per call of each variant: one untimed warm-up call each, then ``repeats`` rounds
    that call every variant once, in turn."""
    for fn in variants.values():
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
