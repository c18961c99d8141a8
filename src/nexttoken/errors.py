"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and what to do, in one line."""
