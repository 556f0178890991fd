"""Errors that the CLI and the service turn into one clear line instead of a traceback."""

MAX_SHOWN_NAME = 240  # longer file names are shortened in the middle in messages


class ChestDxError(Exception):
    """A problem the user can fix: bad input, missing data, missing weights."""


def printable(text, limit: int | None = None) -> str:
    """`text` safe to print on one line: control, bidi-override and other invisible characters (a file
    name is chosen by whoever sent the file) shown as escapes, e.g. \\x00, \\n, \\u202e; then, with
    `limit`, shortened in the middle."""
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
    if limit and len(text) > limit:
        keep = (limit - 1) // 2
        text = f"{text[:keep]}…{text[-keep:]}"
    return text


class InputError(ChestDxError):
    """An input file that cannot be used; the message names the file and the reason, on one line.

    `path` is kept as given; the message shows it through `printable` (at most `MAX_SHOWN_NAME`
    characters), and `reason` is made one printable line."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = printable(" ".join(str(reason).split()))
        self.shown_path = printable(self.path, MAX_SHOWN_NAME) if self.path else "<unnamed file>"
        super().__init__(f"{self.shown_path}: {self.reason}")


class DataLeakageError(ChestDxError):
    """A patient appears in more than one split."""
