"""The one exception type for bad user input; command-line entry points turn it into exit code 2."""


class UserError(Exception):
    """Bad input, a missing file or a mismatched checkpoint: the message says what, where and how to fix it."""
