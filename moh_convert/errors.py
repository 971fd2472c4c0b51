"""The one exception type users see: its message says what is wrong and what to do about it."""


class MoHError(Exception):
    """A problem with the user's input (source, options, files). The CLI prints it as one line, exit code 2."""
