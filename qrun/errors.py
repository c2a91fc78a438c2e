"""The one exception type the CLI turns into a one-line message (no traceback)."""


class QRunError(Exception):
    """A user-facing failure: bad input file, unsupported config, bad flag, out of memory."""
