"""Streams, buckets and the object store, declared once and provisioned idempotently."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from interlock.contracts import protocol
from interlock.contracts import subjects as s

log = logging.getLogger(__name__)

DAY = 24 * 3600.0
ADMIN_AUDIT_MAX_MSG = 64 * 1024


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    description: str
    retention: RetentionPolicy = RetentionPolicy.LIMITS
    max_age: float = 0  # seconds; 0 keeps forever
    audit: bool = False  # deny delete and purge: the audit trail is append-only
    duplicate_window: float = 120.0
    allow_atomic: bool = False
    allow_msg_schedules: bool = False
    max_msg_size: int = 4 * 1024 * 1024
    retired_subjects: tuple[str, ...] = ()  # an older release's subjects: removed, not kept as "added by others"

    def config(self, replicas: int, extra_subjects: list[str] | None = None) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            description=self.description,
            subjects=list(self.subjects) + list(extra_subjects or []),
            retention=self.retention,
            max_age=self.max_age,
            storage=StorageType.FILE,
            num_replicas=replicas,
            deny_delete=self.audit,
            deny_purge=self.audit,
            duplicate_window=self.duplicate_window,
            allow_direct=True,
            allow_atomic=self.allow_atomic or None,
            allow_msg_schedules=self.allow_msg_schedules or None,
            discard=DiscardPolicy.OLD,
            max_msg_size=self.max_msg_size,
        )


STREAMS: tuple[StreamSpec, ...] = (
    # who changed which stream: the auditor's records of the API requests that change a stream
    # (il.admin.audit: who, the request, the answer) and the server's own stream action advisories
    # (kept even when no auditor runs); first, so that the creation of the others is in it. Not the
    # API audit advisories themselves (an older release kept them): the server sends one for every
    # request, reads included, ~1 GB a day from the reconcilers' stream infos alone. One record is
    # capped; the auditor shortens a larger advisory (ADMIN_AUDIT_MAX_MSG, see interlock.core.adminaudit)
    StreamSpec(s.ADMIN_AUDIT_STREAM, [s.ADMIN_AUDIT, *s.JS_STREAM_ACTION_SUBJECTS],
               "Admin audit: who created, updated, purged or deleted which stream",
               max_age=365 * DAY, audit=True, max_msg_size=ADMIN_AUDIT_MAX_MSG, retired_subjects=(s.JS_API_AUDIT,)),
    StreamSpec(s.EVENTS_STREAM, [s.EVENTS_ALL], "Run event logs: the source of truth and the audit trail",
               audit=True, allow_atomic=True),
    # the auditor's signed seals of IL_EVENTS: kept forever, like the log they seal
    StreamSpec(s.SEALS_STREAM, [s.SEALS_ALL], "Seals: the auditor's signed heads of the event stream",
               audit=True),
    StreamSpec(s.TRIGGERS_STREAM, [s.TRIGGERS_ALL], "Trigger events that start runs", max_age=7 * DAY),
    StreamSpec(s.JOBS_STREAM, [s.JOBS_ALL, s.VERSIONED_JOBS_ALL], "Jobs for agent workers (work queue)",
               retention=RetentionPolicy.WORK_QUEUE, max_age=7 * DAY),
    StreamSpec(s.RESULTS_STREAM, [s.RESULTS_ALL, s.HEARTBEATS_ALL], "Job results and worker heartbeats",
               max_age=2 * DAY),
    StreamSpec(s.TIMERS_STREAM, [s.TIMERS_SCHEDULED_ALL, s.TIMERS_FIRED_ALL], "Durable timers",
               max_age=30 * DAY, allow_msg_schedules=True),
    StreamSpec(s.NOTIFY_STREAM, [s.NOTIFY_ALL], "Notifications from notify steps", max_age=7 * DAY),
    StreamSpec(s.DLQ_STREAM, [s.DLQ_ALL], "Dead letters: messages a service could not process",
               max_age=30 * DAY, audit=True),
)


@dataclass(frozen=True)
class BucketSpec:
    name: str
    description: str
    history: int = 1
    ttl: float = 0


BUCKETS: tuple[BucketSpec, ...] = (
    BucketSpec(s.WORKFLOWS_BUCKET, "Registered workflow versions", history=64),
    BucketSpec(s.AGENTS_BUCKET, "Agent registry", ttl=protocol.REGISTRY_TTL_S),
    BucketSpec(s.APPROVERS_BUCKET, "Approvers and the roles they hold", history=16),
    BucketSpec(s.POLICIES_BUCKET, "Policy bundles (the key's history is the bundle history)", history=64),
    BucketSpec(s.DLQ_STATUS_BUCKET, "What was done about each dead letter (resolved, replayed)", history=64),
    BucketSpec(s.KEYRING_BUCKET, "Trusted signing keys: who each is and when it was revoked", history=8),
    BucketSpec(s.APIKEYS_BUCKET, "HTTP API keys: tenant, role, principal and SHA-256 (never the key)", history=8),
    # entries also carry their own expiry (a step's ttl); the bucket drops anything past the longest
    BucketSpec(s.CACHE_BUCKET, "Result cache: successful job outputs by tenant, cache key and job hash",
               ttl=30 * DAY),
    BucketSpec(s.BREAKERS_BUCKET, "Circuit breakers per tenant and topic (the log keys' history is each one's log)",
               history=64),
    BucketSpec(s.ROLLOUTS_BUCKET, "Canary rollouts of agent versions per tenant and topic", history=16),
    BucketSpec(s.GATE_BUCKET, "Workload limits: slot holders, waiting jobs and rate tokens (compare-and-set)"),
)


@dataclass
class Topology:
    replicas: int = 1
    streams: tuple[StreamSpec, ...] = STREAMS
    buckets: tuple[BucketSpec, ...] = BUCKETS
    provisioned: list[str] = field(default_factory=list)


def _same(existing: StreamConfig, wanted: StreamConfig) -> bool:
    keys = ("subjects", "retention", "max_age", "num_replicas", "deny_delete", "deny_purge",
            "duplicate_window", "allow_direct", "allow_atomic", "allow_msg_schedules", "max_msg_size")
    def norm(cfg: StreamConfig, key: str) -> Any:
        value = getattr(cfg, key)
        return sorted(value) if key == "subjects" else (value or None)
    return all(norm(existing, k) == norm(wanted, k) for k in keys)


async def ensure_stream(js: JetStreamContext, spec: StreamSpec, replicas: int) -> str:
    """Create the stream, or bring an existing one in line; keeps subjects others added."""
    try:
        info = await js.stream_info(spec.name)
    except NotFoundError:
        await js.add_stream(spec.config(replicas))
        return "created"
    extra = [subj for subj in (info.config.subjects or [])
             if subj not in spec.subjects and subj not in spec.retired_subjects]
    # never scale a stream down: a client provisioning with the default (1) must not undo R3
    wanted = spec.config(max(replicas, info.config.num_replicas or 1), extra)
    if _same(info.config, wanted):
        return "ok"
    # the retention policy cannot change on a live stream; keep the existing one
    wanted = replace(wanted, retention=info.config.retention)
    await js.update_stream(wanted)
    return "updated"


async def add_stream_subjects(js: JetStreamContext, stream: str, subjects: list[str]) -> None:
    """Add subjects (such as a workflow's trigger subjects) to a stream, idempotently."""
    info = await js.stream_info(stream)
    current = list(info.config.subjects or [])
    missing = [subj for subj in subjects if subj not in current]
    if missing:
        await js.update_stream(replace(info.config, subjects=current + missing))


async def provision(js: JetStreamContext, replicas: int = 1) -> list[str]:
    """Provision every stream, bucket and the payload object store; safe to run on every start."""
    report: list[str] = []
    for spec in STREAMS:
        outcome = await ensure_stream(js, spec, replicas)
        report.append(f"stream {spec.name} ({', '.join(spec.subjects)}): {outcome}")
    for bucket in BUCKETS:
        try:
            await js.key_value(bucket.name)
            outcome = "ok"
        except (NotFoundError, BadRequestError):
            await js.create_key_value(KeyValueConfig(
                bucket=bucket.name, description=bucket.description, history=bucket.history,
                ttl=bucket.ttl or None, replicas=replicas, storage=StorageType.FILE,
            ))
            outcome = "created"
        report.append(f"kv {bucket.name}: {outcome}")
    try:
        await js.object_store(s.PAYLOADS_OBJECT_STORE)
        outcome = "ok"
    except (NotFoundError, BadRequestError):
        await js.create_object_store(s.PAYLOADS_OBJECT_STORE, ObjectStoreConfig(
            description="Large job inputs and outputs", replicas=replicas, storage=StorageType.FILE,
        ))
        outcome = "created"
    report.append(f"object store {s.PAYLOADS_OBJECT_STORE}: {outcome}")
    for line in report:
        log.debug("provision: %s", line)
    return report
