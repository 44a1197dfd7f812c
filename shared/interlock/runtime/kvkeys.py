"""Keys of a KV bucket and a key's history: the one way Interlock lists them.

Not nats-py's ``KeyValue.keys()``, ``history()`` nor a watch: all end at the watcher's first "no more" marker,
which nats-py emits too early when entries are already on the wire but not yet handled (nats.py
issue #842), so a busy machine sees an empty or partial bucket. Here a pull consumer delivers
only what is fetched, and the listing ends when the consumer reports nothing pending. A
``pattern`` means what it means in subjects (``acme.*`` is not ``acme.llm.summarize``), and is
applied by the server, so only the matching keys travel.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue

from interlock.core.retry import Backoff, retrying

log = logging.getLogger(__name__)

LIST_BACKOFF = Backoff(first=0.1, cap=1.0)
LIST_PATIENCE_S = 10.0
_PASSING = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError)

_BATCH = 1024
_FETCH_TIMEOUT_S = 5.0
_LISTER_IDLE_S = 30.0  # the server drops a lister whose client vanished mid-listing
_DELETED = {KV_DEL, KV_PURGE}
_DELETED_MARKERS = {"MaxAge", "Purge", "Remove"}  # nats-server 2.11+ expiry markers


async def matching_keys(kv: KeyValue, pattern: str = ">") -> list[str]:
    """The keys (not deleted) that match ``pattern``, sorted; ``[]`` for none (never raises
    NoKeysError). A passing fault (a busy server's timeout, a leader election) is tried again for
    up to ``LIST_PATIENCE_S``."""
    return await retrying(functools.partial(_list, kv, pattern), what=f"listing the keys of {kv._name}",
                          backoff=LIST_BACKOFF, passing=_PASSING, patience=LIST_PATIENCE_S, logger=log)


async def key_history(kv: KeyValue, key: str) -> list[KeyValue.Entry]:
    """Every kept revision of ``key``, oldest first, deletes included (their ``operation`` says so);
    ``[]`` for a key never written (never raises NoKeysError). Passing faults are tried again as
    in :func:`matching_keys`."""
    return await retrying(functools.partial(_history, kv, key), what=f"reading the history of {kv._name}/{key}",
                          backoff=LIST_BACKOFF, passing=_PASSING, patience=LIST_PATIENCE_S, logger=log)


async def _list(kv: KeyValue, pattern: str) -> list[str]:
    prefix = kv._pre  # nats-py keeps a bucket's subject prefix here
    msgs = await _drain(kv, prefix + pattern, api.DeliverPolicy.LAST_PER_SUBJECT, headers_only=True)
    return sorted(msg.subject[len(prefix):] for msg in msgs if not _deleted(msg.headers))


async def _history(kv: KeyValue, key: str) -> list[KeyValue.Entry]:
    msgs = await _drain(kv, kv._pre + key, api.DeliverPolicy.ALL, headers_only=False)
    entries = []
    for msg in msgs:
        meta = msg.metadata
        operation = (msg.headers or {}).get(KV_OP)
        entries.append(KeyValue.Entry(bucket=kv._name, key=key, value=msg.data or None,
                                      revision=meta.sequence.stream, delta=meta.num_pending,
                                      created=None, operation=operation))
    return entries


async def _drain(kv: KeyValue, filter_subject: str, deliver: api.DeliverPolicy, *, headers_only: bool) -> list[Msg]:
    """Everything an ephemeral consumer on ``filter_subject`` has pending, in stream order."""
    js, stream = kv._js, kv._stream  # nats-py keeps a bucket's stream here
    name = js._nc._nuid.next().decode()
    info = await js.add_consumer(stream, api.ConsumerConfig(
        name=name, filter_subject=filter_subject, deliver_policy=deliver,
        ack_policy=api.AckPolicy.NONE, headers_only=headers_only, mem_storage=True, num_replicas=1,
        inactive_threshold=_LISTER_IDLE_S))
    found: list[Msg] = []
    try:
        remaining = info.num_pending or 0
        if remaining:
            sub = await js.pull_subscribe_bind(name, stream=stream)
            try:
                while remaining > 0:
                    try:
                        msgs = await sub.fetch(min(remaining, _BATCH), timeout=_FETCH_TIMEOUT_S)
                    except nats.errors.TimeoutError:  # entries expired under the listing
                        break
                    for msg in msgs:
                        remaining = msg.metadata.num_pending
                        found.append(msg)
            finally:
                await sub.unsubscribe()
    finally:
        with contextlib.suppress(nats.errors.Error):  # already gone (idle), or the connection closed
            await js.delete_consumer(stream, name)
    return found


def _deleted(headers: dict[str, str] | None) -> bool:
    if not headers:
        return False
    return headers.get(KV_OP) in _DELETED or headers.get(KV_MARKER_REASON) in _DELETED_MARKERS
