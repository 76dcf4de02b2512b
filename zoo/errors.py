"""Errors raised by zoo for bad user input: one clear message, no traceback from deep inside torch."""


class ZooError(ValueError):
    """A user-facing error: the message names the bad value and says what is allowed."""
