"""``sffn`` run in this process and killed from inside at a known point: while it saves its N-th last.ckpt,
after the new file is written and before it is renamed into place (the worst moment for a crash). The
crash-safety tests use it instead of polling the run directory, so no fast or slow machine races them.

    KILL_AT_SAVE=N python tests/killed_run.py ARGS...    (ARGS as for ``sffn``)

N comes from the environment and the arguments are left as they are, so the processes DDP starts (the same
command line, the same environment) run this script too.

The kill is SIGKILL to the process group, so DDP's processes die together (start it in a session of its own).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def kill_while_saving(n: int) -> None:
    """Make the n-th rename of a temporary file onto last.ckpt kill the process group instead."""
    rename = os.replace
    seen = 0

    def replace(src, dst, *args, **kwargs):
        nonlocal seen
        if Path(dst).name == "last.ckpt":
            seen += 1
            if seen == n:
                os.killpg(os.getpgid(0), signal.SIGKILL)
        return rename(src, dst, *args, **kwargs)

    os.replace = replace


if __name__ == "__main__":
    kill_while_saving(int(os.environ["KILL_AT_SAVE"]))
    from sffn_lab.cli import main

    main()
