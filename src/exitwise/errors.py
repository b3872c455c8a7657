"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file that does not fit). Not a bug."""
