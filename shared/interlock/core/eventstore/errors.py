"""What the event store raises, and what its callers raise to it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from interlock.core.run import IllegalTransition

if TYPE_CHECKING:
    from interlock.core.eventstore.repository import RunHandle


class EventStoreError(Exception):
    """Base of event store errors."""


class RunNotFound(EventStoreError):
    """No commit of the run is stored (under that tenant)."""

    def __init__(self, tenant: str, run_id: str) -> None:
        super().__init__(f"run {run_id} not found for tenant {tenant!r}")
        self.tenant = tenant
        self.run_id = run_id


class ChainBroken(EventStoreError):
    """The stored log is not a gap-free hash chain: it was edited, reordered or truncated."""


class TooManyConflicts(EventStoreError):
    """An update lost the race to other writers more often than it may try."""


class RunExists(EventStoreError):
    """:meth:`EventStore.start_run` found the run already started; ``handle`` is its state."""

    def __init__(self, handle: RunHandle) -> None:
        super().__init__(f"run {handle.run_id} already exists")
        self.handle = handle


class StaleState(EventStoreError):
    """Raised by a decide whose input (a result, a timer) is newer than the run it was given."""


class Conflict(Exception):
    """Another writer appended first (the expected last sequence no longer holds).

    Not an :class:`EventStoreError`: the repository always handles it (reload and decide
    again, or :class:`RunExists`), so it never reaches a service's error handling.
    """


__all__ = [
    "ChainBroken",
    "Conflict",
    "EventStoreError",
    "IllegalTransition",
    "RunExists",
    "RunNotFound",
    "StaleState",
    "TooManyConflicts",
]
