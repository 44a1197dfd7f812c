class RetryableError(Exception):
    """The attempt failed but another may succeed (the default for any exception)."""


class FatalError(Exception):
    """The job can never succeed: no retry."""
