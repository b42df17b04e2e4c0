"""The one exception type for user errors: the CLI prints its message and exits 2."""


class GraftError(ValueError):
    """A user-facing error: one line naming the thing, the problem and the fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    wrapping a library's error into a one-line GraftError."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines and lines[0] else type(e).__name__
