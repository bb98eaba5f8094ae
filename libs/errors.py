"""The one exception type for bad user input; command-line entry points turn it into one line and its exit code."""


class UserError(Exception):
    """Bad input, a missing file or a mismatched checkpoint: the message says what, where and how to fix it."""
    exit_code = 2  # what libs.cli exits with; a subclass may define another (train_empath.py's diverged run: 3)
