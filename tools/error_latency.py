"""How long ``sffn`` takes to answer a user mistake: the median wall time of 5 runs of each command.

    python tools/error_latency.py [--checkout DIR]

``--checkout`` runs another checkout's ``sffn_lab`` (e.g. an exported older commit) with this interpreter, for a
before / after comparison on the same machine; by default, this one's. Every command is a refused input: its
exit code, printed last, is 2."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (
    ["train", "--set", "no.such.key=1"],
    ["train", "-c", "/nonexistent.yaml"],
    ["eval", "/nonexistent.ckpt"],
    ["sample", "/nonexistent", "--top-k", "0"],
    ["ablate", "/nonexistent.yaml"],
)
REPEATS = 5
HERE = Path(__file__).resolve().parent.parent  # the checkout this script belongs to


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", default=None, help="Run the sffn_lab of this folder instead.")
    args = parser.parse_args()
    checkout = Path(args.checkout or HERE).resolve()
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    print(f"sffn_lab of {checkout}, {os.cpu_count()} CPUs")
    print(f"{'command':45} median of {REPEATS} (min–max), exit code")
    for command in COMMANDS:
        times, codes = [], set()
        for _ in range(REPEATS):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "sffn_lab", *command], env=env, cwd=checkout,
                                  capture_output=True)
            times.append(time.perf_counter() - start)
            codes.add(done.returncode)
        print(f"sffn {' '.join(command):40} {statistics.median(times):5.2f} s ({min(times):.2f}–{max(times):.2f}), "
              f"{'/'.join(map(str, sorted(codes)))}")


if __name__ == "__main__":
    main()
