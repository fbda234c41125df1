"""Other processes competing for the CPU cores, checked before CPU training or benchmarking.

torch runs its OpenMP threads in lock step; when another process holds one of the cores they need,
every parallel region waits for it, and steps get several times slower without any error (two
2-thread trainings on 2 cores ran 5–7× slower here). Linux's ``/proc/loadavg`` gives the number of
runnable tasks at this instant, which is what matters, unlike the lagging load averages.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

LOADAVG = Path("/proc/loadavg")


def other_runnable_tasks(samples: int = 3, interval_s: float = 0.02) -> int | None:
    """Runnable tasks other than the caller, the minimum over a few samples (brief spikes are not
    contention); None where ``/proc/loadavg`` does not exist."""
    counts = []
    for i in range(samples):
        try:
            running = LOADAVG.read_text().split()[3]  # "runnable/total", the reader included
        except (OSError, IndexError):
            return None
        counts.append(int(running.split("/")[0]) - 1)
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0, min(counts))


def contention_warning(threads: int) -> str | None:
    """A one-line warning when ``threads`` torch threads plus the other runnable tasks exceed the cores."""
    others = other_runnable_tasks()
    cores = os.cpu_count() or 1
    if others is None or others + threads <= cores:
        return None
    return (f"{others} other process(es) are running on this machine's {cores} cores and torch uses "
            f"{threads} threads: steps may run several times slower, and tokens/s and timings will not "
            "be comparable with runs on an idle machine.")
