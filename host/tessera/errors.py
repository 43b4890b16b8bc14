"""Errors the CLI reports as a clean message (exit status 2) instead of a traceback."""


class TesseraError(Exception):
    """A user-facing failure: bad arguments, unreachable board, invalid input file."""
