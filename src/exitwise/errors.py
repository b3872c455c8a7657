"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file that does not fit). Not a bug."""


def first_line(e: BaseException, chars: int = 200) -> str:
    """An exception's message cut to its first line and `chars` characters for a one-line error (its type's name
    where it has no message: `str(MemoryError())` is empty)."""
    return (str(e).strip().splitlines() or [""])[0][:chars] or type(e).__name__
