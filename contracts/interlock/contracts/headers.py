"""NATS header names Interlock reads or writes, declared once.

The catalog (:mod:`interlock.contracts.catalog`) documents which channel carries which header;
code that sets or reads a header takes its name from here, never from a string literal.
"""

from __future__ import annotations

MSG_ID = "Nats-Msg-Id"
"""JetStream deduplication id: a re-published message with the same id is stored once."""

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
"""The subject filter (wildcards allowed) whose last sequence ``EXPECTED_LAST_SUBJECT_SEQ`` names:
a run's commits are on several subjects below its log."""
"""Optimistic concurrency: the stream sequence the subject's last message must have."""

SCHEDULE = "Nats-Schedule"
"""JetStream message schedules: when a scheduled message fires ('@at ' + RFC 3339 UTC)."""

SCHEDULE_TARGET = "Nats-Schedule-Target"
"""JetStream message schedules: the subject the fired message is published to."""

REPLAY_OF = "Interlock-Replay-Of"
"""On a dead letter's original published again (``interlock dlq replay``): the dead letter's id
(its ``IL_DLQ`` stream sequence)."""

TRACEPARENT = "traceparent"
"""W3C trace context of the message's run and step."""

# Headers of a batched direct-get reply, set by the server.
SUBJECT = "Nats-Subject"
"""Subject of the message returned."""

SEQUENCE = "Nats-Sequence"
"""Stream sequence of the message returned."""

NUM_PENDING = "Nats-Num-Pending"
"""End of a batch: messages left after it."""

LAST_SEQUENCE = "Nats-Last-Sequence"
"""End of a batch: the stream sequence the batch stopped at."""

# Authorship of a run commit (see contracts/README.md, "Signed commits").
SIGNER = "Interlock-Signer"
"""The key id (nkey public key, ``U…``) of the service instance that signed a run commit."""

SIGNATURE = "Interlock-Signature"
"""base64url (no padding) Ed25519 signature of the commit's canonical statement."""

TIMESTAMP = "Nats-Time-Stamp"
"""Set by the server on a direct-get reply: when the message was stored (RFC 3339)."""
