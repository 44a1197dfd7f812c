"""The async event store: runs loaded by replay from JetStream, appended with optimistic concurrency.

Two layers, the way eventsourcing separates a recorder from its repository:

- :mod:`~interlock.core.eventstore.recorder`: JetStream I/O only — conditional, deduplicated
  appends that ride through failover and lost acks; batched direct-get reads.
- :mod:`~interlock.core.eventstore.repository`: :class:`EventStore` — load by replay with the
  hash chain checked, the LRU run cache kept current by :meth:`EventStore.observe`, and
  :meth:`EventStore.update`, which decides, appends, and on a conflict reloads and decides again
  (grouping concurrent updates of one run into one commit).
"""

from interlock.core.eventstore.errors import (
    ChainBroken,
    Conflict,
    EventStoreError,
    IllegalTransition,
    RunExists,
    RunNotFound,
    StaleState,
    TooManyConflicts,
)
from interlock.core.eventstore.recorder import (
    DUPLICATE_IN_PROCESS,
    WRONG_LAST_SEQUENCE,
    JetStreamRecorder,
    SlotsBusy,
    StoredCommit,
)
from interlock.core.eventstore.repository import MAX_COMMIT_EVENTS, Decide, EventStore, RunHandle

__all__ = [
    "DUPLICATE_IN_PROCESS",
    "MAX_COMMIT_EVENTS",
    "WRONG_LAST_SEQUENCE",
    "ChainBroken",
    "Conflict",
    "Decide",
    "EventStore",
    "EventStoreError",
    "IllegalTransition",
    "JetStreamRecorder",
    "RunExists",
    "RunHandle",
    "RunNotFound",
    "SlotsBusy",
    "StaleState",
    "StoredCommit",
    "TooManyConflicts",
]
