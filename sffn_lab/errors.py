"""The one exception type for mistakes a user can fix (bad config, missing corpus, ...), and the
"did you mean" hint its messages share.

The CLI prints its message as a short paragraph and exits with code 2, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input, explained in plain words in the message."""

    exit_code = 2


def did_you_mean(value: str, options: Iterable[str], cutoff: float = 0.6) -> str:
    """" Did you mean 'x'?" for the closest option, or "" when none is close."""
    close = difflib.get_close_matches(value, list(options), n=1, cutoff=cutoff)
    return f" Did you mean '{close[0]}'?" if close else ""
