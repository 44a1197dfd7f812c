"""Subjects that NATS permissions are written in, built from :mod:`interlock.contracts.subjects`.

A permission names subjects with wildcards (``*`` one token, ``>`` the rest), and besides
Interlock's own subjects it must name the server's: the JetStream API per stream, the internal
subjects of key-value buckets and object stores, the system account's claim updates and reply
inboxes. They are declared here, so nothing outside ``contracts/`` spells them.

``pattern(build, *args)`` turns a subject function into a permission pattern: pass :data:`ANY`
or :data:`REST` where a parameter should be a wildcard, e.g. ``pattern(s.run_events, "acme", ANY)``.

The ``tenant_*`` functions at the end are a PROPOSED contract change (identity, issue 10): job,
trigger, command and query subjects that carry the tenant (and, for commands, the principal),
so that the server can pin a credential to its tenant. No service uses them yet.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from interlock.contracts import subjects as s

ANY = "*"
REST = ">"

_SENTINEL = "zzwildcard{}zz"


def pattern(build: Callable[..., str], *args: str) -> str:
    """``build(*args)`` with each :data:`ANY` / :data:`REST` argument left as that wildcard.

    ``REST`` must be the last argument and build the last tokens of the subject.
    """
    values = [_SENTINEL.format(i) if a in (ANY, REST) else a for i, a in enumerate(args)]
    subject = build(*values)
    for i, a in enumerate(args):
        if a in (ANY, REST):
            sentinel = _SENTINEL.format(i)
            if subject.count(sentinel) != 1:
                raise ValueError(f"{build.__name__}: argument {i} does not appear once in {subject!r}")
            if a == REST and not subject.endswith(sentinel):
                raise ValueError(f"{build.__name__}: '>' must stand for the last tokens of {subject!r}")
            subject = subject.replace(sentinel, a)
    return subject


# -- the JetStream API ------------------------------------------------------------------------
JS_API_ALL = f"{s.JS_API_PREFIX}.>"
JS_ACK_PREFIX = "$JS.ACK"
JS_FLOW_CONTROL_PREFIX = "$JS.FC"

STREAM_ADMIN_ACTIONS = ("CREATE", "UPDATE", "DELETE", "PURGE", "MSG.DELETE", "SNAPSHOT", "RESTORE")
"""Stream API actions that change or remove a stream or its messages: admin only."""


def _stream(stream: str) -> str:
    return stream if stream in (ANY, REST) else s.token(stream, "stream")


def js_stream(action: str, stream: str) -> str:
    """``$JS.API.STREAM.{action}.{stream}``, e.g. ``js_stream("DELETE", s.EVENTS_STREAM)``."""
    return f"{s.JS_API_PREFIX}.STREAM.{action}.{_stream(stream)}"


def js_stream_admin(stream: str = ANY) -> tuple[str, ...]:
    """Every API subject that changes or removes ``stream`` (default: any stream)."""
    return (*(js_stream(a, stream) for a in STREAM_ADMIN_ACTIONS), f"{s.JS_API_PREFIX}.ACCOUNT.PURGE.>")


def js_stream_info(stream: str) -> str:
    return js_stream("INFO", stream)


def js_consumer_access(stream: str) -> tuple[str, ...]:
    """Reading a stream through consumers and direct gets: stream info and message get; create
    (ephemeral, named, durable), inspect, list, pull from and delete consumers; direct gets;
    acks and flow-control replies. Written with wildcards to keep user JWTs small (the whole
    JWT travels in the client's CONNECT line)."""
    st = _stream(stream)
    api = s.JS_API_PREFIX
    return (
        js_stream_info(st), f"{api}.STREAM.MSG.GET.{st}",
        f"{api}.CONSUMER.*.{st}", f"{api}.CONSUMER.*.{st}.>",  # CREATE, INFO, DELETE, LIST, NAMES
        f"{api}.CONSUMER.*.*.{st}.*",  # DURABLE.CREATE, MSG.NEXT
        f"{api}.DIRECT.GET.{st}", f"{api}.DIRECT.GET.{st}.>",
        f"{JS_ACK_PREFIX}.{st}.>", js_flow_control(st),
    )


def js_filtered_consumer_create(stream: str, filter_subject: str, consumer: str = ANY) -> str:
    """Creating a consumer whose filter is part of the API subject (nats-server ≥ 2.9 with a
    consumer ``name``), so the server holds the creator to that filter."""
    name = consumer if consumer == ANY else s.token(consumer, "consumer")
    return f"{s.JS_API_PREFIX}.CONSUMER.CREATE.{_stream(stream)}.{name}.{filter_subject}"


def js_ack(stream: str, consumer: str) -> str:
    """Acks (and naks, in-progress, terms) of one consumer's messages."""
    return f"{JS_ACK_PREFIX}.{_stream(stream)}.{s.token(consumer, 'consumer')}.>"


def js_consumer_info(stream: str, consumer: str) -> str:
    return f"{s.JS_API_PREFIX}.CONSUMER.INFO.{_stream(stream)}.{s.token(consumer, 'consumer')}"


# -- key-value buckets and object stores (JetStream streams underneath) ------------------------
def kv_stream(bucket: str) -> str:
    return f"KV_{s.token(bucket, 'bucket')}"


def kv_keys(bucket: str) -> str:
    """Every key of a bucket: publish to put or delete, the stream's subjects to read."""
    return f"$KV.{s.token(bucket, 'bucket')}.>"


def object_stream(name: str) -> str:
    return f"OBJ_{s.token(name, 'object store')}"


def object_subjects(name: str) -> str:
    """Chunks and metadata of an object store."""
    return f"$O.{s.token(name, 'object store')}.>"


# -- the system account ------------------------------------------------------------------------
SYS_CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"
"""Push an account JWT to the server's resolver at run time (from a system-account user)."""


def sys_account_claims_update(account: str) -> str:
    return f"$SYS.REQ.ACCOUNT.{s.token(account, 'account')}.CLAIMS.UPDATE"


# -- reply inboxes -----------------------------------------------------------------------------
INBOX_ROOT = "_INBOX"


def inbox_prefix(owner: str) -> str:
    """A principal's own inbox prefix (pass it as ``inbox_prefix=`` when connecting), so that
    nobody else can subscribe to its replies."""
    return f"{INBOX_ROOT}.{s.token(owner, 'inbox owner')}"


def inbox_all(owner: str) -> str:
    return f"{inbox_prefix(owner)}.>"


# -- PROPOSED: tenant-carrying subjects (contract change, not used by any service yet) ----------
def tenant_job(tenant: str, topic: str) -> str:
    """PROPOSED job subject ``{PREFIX}.job.{tenant}.{topic}`` (today's :func:`subjects.job` has no tenant)."""
    return f"{s.PREFIX}.job.{s.token(tenant, 'tenant')}.{s.topic_tokens(topic)}"


def tenant_jobs_all(tenant: str) -> str:
    return f"{s.PREFIX}.job.{s.token(tenant, 'tenant')}.>"


def tenant_worker_consumer(tenant: str, topic: str) -> str:
    """PROPOSED durable consumer of one tenant's workers of one topic.

    The readable part alone is ambiguous (``_`` may occur in tenants and topics), so a digest
    of the exact pair follows: two (tenant, topic) pairs never share a consumer.
    """
    readable = f"{s.token(tenant, 'tenant')}_{s.topic_tokens(topic).replace('.', '_')}"
    digest = hashlib.sha256(f"{tenant}\n{topic}".encode()).hexdigest()[:16]
    return f"worker_{readable}_{digest}"


def tenant_trigger(tenant: str, workflow_id: str) -> str:
    """PROPOSED trigger subject ``{PREFIX}.trigger.{tenant}.{workflow_id}``."""
    return f"{s.PREFIX}.trigger.{s.token(tenant, 'tenant')}.{s.token(workflow_id, 'workflow id')}"


def tenant_command(tenant: str, name: str, principal: str) -> str:
    """PROPOSED command subject ``{PREFIX}.cmd.{tenant}.{name}.{principal}``: the server pins a
    credential to its tenant and principal, so the approval service reads who approved from
    the subject, never from the body."""
    return (f"{s.PREFIX}.cmd.{s.token(tenant, 'tenant')}.{s.token(name, 'command')}."
            f"{s.token(principal, 'principal')}")


def tenant_query(tenant: str, name: str) -> str:
    """PROPOSED query subject ``{PREFIX}.q.{tenant}.{name}``: the auditor answers for that tenant only."""
    return f"{s.PREFIX}.q.{s.token(tenant, 'tenant')}.{s.token(name, 'query')}"


def tenant_agent_key(tenant: str, topic: str) -> str:
    """PROPOSED agent-registry keys of one tenant's workers of one topic (``{tenant}.{topic}.{worker_id}``)."""
    return f"$KV.{s.AGENTS_BUCKET}.{s.token(tenant, 'tenant')}.{s.topic_tokens(topic)}.*"


def js_flow_control(stream: str, consumer: str = REST) -> str:
    """Flow-control replies of consumers on ``stream`` (ordered consumers answer them);
    with ``consumer``, of that consumer only."""
    if consumer == REST:
        return f"{JS_FLOW_CONTROL_PREFIX}.{_stream(stream)}.>"
    return f"{JS_FLOW_CONTROL_PREFIX}.{_stream(stream)}.{s.token(consumer, 'consumer')}.*"


PRINCIPAL_CONSUMER_SLOTS = 3
"""How many consumers of one stream a person's credential may hold at once (e.g. watches)."""


def principal_consumer(owner: str, slot: int) -> str:
    """The name of a person's consumer number ``slot`` (0 ≤ slot < PRINCIPAL_CONSUMER_SLOTS).

    People may create, read and delete only consumers with these names, so they can neither
    pull from nor re-configure the services' consumers (a create with an existing name is
    an update)."""
    if not 0 <= slot < PRINCIPAL_CONSUMER_SLOTS:
        raise ValueError(f"consumer slot {slot} out of range 0..{PRINCIPAL_CONSUMER_SLOTS - 1}")
    digest = hashlib.sha256(s.token(owner, "consumer owner").encode()).hexdigest()[:16]
    return f"u{digest}_{slot}"
