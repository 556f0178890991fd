"""Errors that the CLI and the service turn into one clear line instead of a traceback."""


class ChestDxError(Exception):
    """A problem the user can fix: bad input, missing data, missing weights."""


class InputError(ChestDxError):
    """An input file that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DataLeakageError(ChestDxError):
    """A patient appears in more than one split."""
