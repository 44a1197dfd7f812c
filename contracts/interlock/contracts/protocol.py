"""The numbers and derivations of the wire protocol that a client or worker in another language
must share with Interlock, declared once.

The Python code reads them from here (the worker SDK's consumer settings and registry refresh,
the payload inline limit, the dead-letter bounds, the run id), and the generator writes them into
``asyncapi.json`` (``x-interlock-protocol``) and the table in ``contracts/README.md``, so the
documented value is always the value in force. Heartbeat and lease timings travel in each
:class:`~interlock.contracts.messages.Job` (``heartbeat_interval_ms``, ``deadline``): a worker
reads them from the job, never from here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from interlock.contracts import timing

# -- run ids ---------------------------------------------------------------------------------
RUN_ID_NAMESPACE = uuid.UUID("6f1c2a8e-0d4b-5b7e-9a51-3c2d7e8f9a10")
"""uuid5 namespace of run ids: ``run_id = uuid5(RUN_ID_NAMESPACE, f"{tenant}/{workflow_id}/{idempotency_key}")``,
lower-case hex with dashes. The same trigger always names the same run, so a client computes the run
id of its own trigger (a trigger gets no reply)."""

RUN_ID_NAME_FORMAT = "{tenant}/{workflow_id}/{idempotency_key}"
"""The uuid5 name of a run id (UTF-8): the run's tenant, its workflow id and the trigger's idempotency key."""


def run_id_for(tenant: str, workflow_id: str, idempotency_key: str) -> uuid.UUID:
    """The id of the run that the trigger (tenant, workflow_id, idempotency_key) starts."""
    return uuid.uuid5(RUN_ID_NAMESPACE, RUN_ID_NAME_FORMAT.format(
        tenant=tenant, workflow_id=workflow_id, idempotency_key=idempotency_key))


# A run started on a workflow's own trigger subject (any JSON body) has the message's
# Nats-Msg-Id header as its idempotency key, else the sha256 hex of the body.
DECLARED_TRIGGER_KEY = "the Nats-Msg-Id header of the message, else the sha256 hex digest of its body"

# -- payloads --------------------------------------------------------------------------------
INLINE_LIMIT_BYTES = 256 * 1024
"""Default largest payload (a job's input, a result's output) sent inline, measured as canonical JSON
(keys sorted, no whitespace, UTF-8). A larger one goes into the object store and travels as a
``PayloadRef`` (``input_ref`` / ``output_ref``). Configurable per process (``INTERLOCK_INLINE_LIMIT``);
a receiver accepts either form whatever the size."""

# -- the worker's job consumer ---------------------------------------------------------------


@dataclass(frozen=True)
class ConsumerSettings:
    """The configuration of a durable JetStream pull consumer, as JetStream names its fields."""

    ack_policy: str
    ack_wait_s: float
    max_ack_pending: int
    max_deliver: int
    deliver_policy: str

    def as_jetstream(self) -> dict[str, object]:
        """The fields of a JetStream ``ConsumerConfig`` (``ack_wait`` in nanoseconds)."""
        return {"ack_policy": self.ack_policy, "ack_wait": int(self.ack_wait_s * 1e9),
                "max_ack_pending": self.max_ack_pending, "max_deliver": self.max_deliver,
                "deliver_policy": self.deliver_policy}


WORKER_CONSUMER = ConsumerSettings(ack_policy="explicit", ack_wait_s=timing.ACK_WAIT_S, max_ack_pending=20_000,
                                   max_deliver=timing.JOB_MAX_DELIVER, deliver_policy="all")
"""Every copy of a worker creates the tenant's topic consumer (``subjects.worker_consumer``) with exactly
these settings (plus ``name`` = ``durable_name`` and ``filter_subject``), so whichever copy creates it, it
is the same consumer. A worker holds a job un-acked while it works on it, with a progress ack every
``timing.PROGRESS_INTERVAL_S``, and acks it once its result is published: a dead worker's job goes to
another copy within the ack wait (see :mod:`interlock.contracts.timing`)."""

VERSION_SLOT_IDLE_S = 3600.0
"""A versioned worker consumer (``subjects.worker_version_consumer``) nobody pulled from for this long
is removed by the server (its ``inactive_threshold``): the slot is free for another version. Jobs left
for that version stay in the stream until a worker of the version takes a slot again."""

# -- the agent registry ----------------------------------------------------------------------
REGISTRY_REFRESH_S = 5.0
"""A worker rewrites its ``AgentRegistration`` (new ``last_heartbeat``) this often."""

REGISTRY_STALE_AFTER_S = 3 * REGISTRY_REFRESH_S
"""A reader treats an entry whose ``last_heartbeat`` is older than this as a worker that is gone
(it crashed: a clean shutdown deletes its entries)."""

REGISTRY_TTL_S = 24 * 3600.0
"""The bucket drops an entry nobody rewrote for this long (a crashed worker's entry)."""

# -- dead letters ----------------------------------------------------------------------------
DEAD_LETTER_PREFIX_LIMIT = 64 * 1024
"""A dead letter keeps the whole original up to this many bytes; a larger original keeps this many
(``truncated: true``) plus its ``size`` and ``sha256``."""

DEAD_LETTER_HEADERS_LIMIT = 16 * 1024
"""A dead letter's copied headers total at most about this many bytes (else the first 32, each cut to
256 characters)."""

DEAD_LETTER_REASON_LIMIT = 2000
"""Characters of ``reason`` kept in a dead letter."""


_EXAMPLE_TRIGGER = {"tenant": "default", "workflow_id": "incident-remediation", "idempotency_key": "order-42"}


def table() -> dict[str, object]:
    """Every value above, by name, as it appears in ``asyncapi.json`` (``x-interlock-protocol``)."""
    return {
        "run_id": {"uuid5_namespace": str(RUN_ID_NAMESPACE), "name": RUN_ID_NAME_FORMAT,
                   "declared_trigger_idempotency_key": DECLARED_TRIGGER_KEY,
                   "example": {**_EXAMPLE_TRIGGER, "run_id": str(run_id_for(**_EXAMPLE_TRIGGER))}},
        "inline_limit_bytes": INLINE_LIMIT_BYTES,
        "worker_consumer": WORKER_CONSUMER.as_jetstream(),
        "versioned_worker_consumer": {**WORKER_CONSUMER.as_jetstream(),
                                      "inactive_threshold": int(VERSION_SLOT_IDLE_S * 1e9)},
        "registry": {"refresh_s": REGISTRY_REFRESH_S, "stale_after_s": REGISTRY_STALE_AFTER_S,
                     "ttl_s": REGISTRY_TTL_S},
        "dead_letter": {"prefix_limit_bytes": DEAD_LETTER_PREFIX_LIMIT,
                        "headers_limit_bytes": DEAD_LETTER_HEADERS_LIMIT,
                        "reason_limit_chars": DEAD_LETTER_REASON_LIMIT},
    }
