"""User-facing errors. Scripts catch `KAError` and exit with status 2 and its message."""


class KAError(ValueError):
    """Bad input or an unsupported setup, with a message that says what to do instead."""
