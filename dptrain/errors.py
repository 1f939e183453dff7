"""The one exception type for mistakes a user can fix (bad config, bad data, bad checkpoint).

The CLI prints it as a single line and exits with code 2; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input: a config, data set, checkpoint or budget the user supplied is unusable."""


class Stopped(Exception):
    """A run stopped on request (SIGTERM, Ctrl-C) after saving what it had: not a failure of the
    input, not a bug. The CLI prints the message (how to resume) and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
