"""The one exception type for mistakes a user can fix (bad config, bad data, bad checkpoint).

The CLI prints it as a single line and exits with code 2; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input: a config, data set, checkpoint or budget the user supplied is unusable."""
