"""Turning NATS authorization failures into one clear line naming principal, action and permission.

What nats-py gives us is indirect: a denied core publish or subscribe returns normally and is
reported later through ``error_cb`` as ``nats: permissions violation for publish to "…"``
(lowercased, subject included); a denied JetStream publish or API request is dropped by the
server, so the client sees only a timeout; a refused connect is ``AuthorizationError``; a
revoked user's connection closes with "authentication revoked".
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import nats.errors

_VIOLATION = re.compile(r"permissions violation for (publish|subscription) to \"?([^\"\s]+)\"?", re.IGNORECASE)


class PermissionDenied(Exception):
    """The server refused an action for lack of a permission (str: one clear line)."""

    def __init__(self, message: str, *, principal: str, action: str, subject: str | None = None) -> None:
        super().__init__(message)
        self.principal = principal
        self.action = action
        self.subject = subject


def _original_case(subject: str, candidates: Iterable[str]) -> str:
    for candidate in candidates:
        if candidate.lower() == subject.lower():
            return candidate
    return subject


def permission_violation(error: BaseException) -> tuple[str, str] | None:
    """(``publish`` or ``subscribe``, subject) if ``error`` is a permissions violation, else None."""
    match = _VIOLATION.search(str(error))
    if not match:
        return None
    return ("subscribe" if match.group(1).lower() == "subscription" else "publish"), match.group(2)


def describe_permission_error(error: BaseException, *, principal: str, action: str,
                              subject: str | None = None) -> str | None:
    """One line saying who may not do what and which permission is missing, or None if ``error``
    is not an authorization failure. ``subject``: what the action published to, if known (a
    timeout does not say, and the server lowercases subjects in violations)."""
    violation = permission_violation(error)
    if violation is not None:
        verb, denied = violation
        denied = _original_case(denied, [subject] if subject else [])
        return f"{principal} may not {action}: the credential lacks permission to {verb} to {denied!r}"
    text = str(error).lower()
    if isinstance(error, nats.errors.AuthorizationError) or "authorization violation" in text:
        return (f"{principal} may not {action}: the server refused the connection's credentials "
                "(none given, unknown, expired or not signed by this server's operator)")
    if "revoked" in text:
        return f"{principal} may not {action}: the credential was revoked"
    if isinstance(error, (TimeoutError, nats.errors.TimeoutError)):
        target = f" to {subject!r}" if subject else ""
        return (f"{principal} could not {action}: no reply{target} in time. The server silently drops "
                f"requests a credential may not publish, so the likely cause is a missing permission to "
                f"publish{target} (or no service answering)")
    return None


def permission_error(error: BaseException, *, principal: str, action: str,
                     subject: str | None = None) -> PermissionDenied | None:
    """``describe_permission_error`` as an exception to raise, or None."""
    message = describe_permission_error(error, principal=principal, action=action, subject=subject)
    return None if message is None else PermissionDenied(message, principal=principal, action=action, subject=subject)
