"""The one exception type users see: a clear, one-line message naming what is wrong."""


class UnmaskError(Exception):
    """Bad input or state. The message names the flag, file or value and what would be right.

    The CLI prints it as a single ``error: ...`` line and exits with status 2, without a traceback.
    """
