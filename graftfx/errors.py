"""The one exception type for user errors: the CLI prints its message and exits 2."""


class GraftError(ValueError):
    """A user-facing error: one line naming the thing, the problem and the fix."""
