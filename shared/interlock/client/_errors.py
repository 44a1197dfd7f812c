"""What the client raises: one exception family whose str() is one line, ready to print."""

from __future__ import annotations


class ClientError(Exception):
    """A problem the caller can report as it is: str() is one clear line."""


class Unavailable(ClientError):
    """No NATS server at the URL, nobody answers a request, or a setting is unusable."""


class Refused(ClientError):
    """The service (or the registry / bundle store) received the command and said no."""


class NotFound(ClientError):
    """The run, workflow, workflow version, step or pending approval is unknown."""
