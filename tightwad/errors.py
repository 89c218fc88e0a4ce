"""Errors a user can act on: each message says what is wrong and what to do."""


class TightwadError(Exception):
    """Base for errors that the CLI prints as one line instead of a traceback."""
