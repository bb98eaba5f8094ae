"""The one exception type for bad user input; command-line entry points turn it into one line and its exit code."""


class UserError(Exception):
    """Bad input, a missing file or a mismatched checkpoint: the message says what, where and how to fix it.

    ``details`` are lines that follow the message when one line cannot hold them readably (e.g. one missing file per
    line, each with the command that gets it): libs.cli prints the message as the error line, then each detail on a
    line of its own, so that a command can be copied whole.
    """
    exit_code = 2  # what libs.cli exits with; a subclass may define another (train_empath.py's diverged run: 3)

    def __init__(self, message: str = '', details=()):
        super().__init__(message)
        self.details = tuple(details)

    @property
    def headline(self) -> str:
        """The message without its details."""
        return str(self.args[0]) if self.args else ''

    def __str__(self):
        return '\n'.join((self.headline, *self.details))

    def __reduce__(self):  # a DataLoader worker's error crosses a process boundary pickled
        return type(self), (self.headline, self.details)
