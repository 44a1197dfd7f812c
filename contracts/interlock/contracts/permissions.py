"""Subjects that NATS permissions are written in, built from :mod:`interlock.contracts.subjects`.

A permission names subjects with wildcards (``*`` one token, ``>`` the rest), and besides
Interlock's own subjects it must name the server's: the JetStream API per stream, the internal
subjects of key-value buckets and object stores, the system account's claim updates and reply
inboxes. They are declared here, so nothing outside ``contracts/`` spells them.

``pattern(build, *args)`` turns a subject function into a permission pattern: pass :data:`ANY`
or :data:`REST` where a parameter should be a wildcard, e.g. ``pattern(s.run_events, "acme", ANY)``.

Job, trigger, command and query subjects carry the tenant (commands also the principal), so a
permission pins a credential to its tenant with e.g. ``pattern(s.job, "acme", REST)``.
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
JS_STREAM_NAMES = f"{s.JS_API_PREFIX}.STREAM.NAMES"
"""Listing stream names (nats-py finds a subject's stream so, e.g. reading an object store)."""
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


def js_consumer_delete(stream: str, consumer: str) -> str:
    return f"{s.JS_API_PREFIX}.CONSUMER.DELETE.{_stream(stream)}.{s.token(consumer, 'consumer')}"


# -- key-value buckets and object stores (JetStream streams underneath) ------------------------
def kv_stream(bucket: str) -> str:
    return f"KV_{s.token(bucket, 'bucket')}"


def kv_keys(bucket: str) -> str:
    """Every key of a bucket: publish to put or delete, the stream's subjects to read."""
    return f"$KV.{s.token(bucket, 'bucket')}.>"


def kv_key(bucket: str, key: str) -> str:
    """The subject of one key (or key pattern) of a bucket, e.g.
    ``kv_key(s.AGENTS_BUCKET, pattern(s.agent_key, "acme", "llm.summarize", ANY))``."""
    return f"$KV.{s.token(bucket, 'bucket')}.{key}"


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
