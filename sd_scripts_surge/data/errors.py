"""The data pipeline's error type."""


class DataError(ValueError):
    """The training data cannot be used as configured; the message says what and where."""
