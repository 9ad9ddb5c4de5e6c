"""Errors the data tools raise for bad input; the CLI prints them as one line and exits non-zero."""


class DataError(RuntimeError):
    """A problem with the user's data or paths that the user must fix (message is one line)."""
