"""The one exception type for mistakes a user can fix (bad config, missing corpus, ...).

The CLI prints its message as a short paragraph and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in plain words in the message."""

    exit_code = 2
