"""The JetStream side of the event store: conditional appends and batched reads of one subject.

- An append carries ``headers.EXPECTED_LAST_SUBJECT_SEQ`` (the stream sequence of the subject's
  last message) and a deterministic ``headers.MSG_ID``, so a retried publish is deduplicated and
  a concurrent writer gets :class:`Conflict` (10071), never a fork.
- A lost ack (timeout, leader election, reconnect) is resolved by reading the subject's last
  message: if it carries our message id the append landed. Otherwise the recorder tries again
  for up to ``failover_patience`` seconds.
- Reads are batched direct gets (one request for a whole run) on one shared reply inbox; a
  credential that may not direct-get (a person's: a batch get cannot be held to a tenant) reads
  through one of its own named consumers (``slots``), created for the read with the subject as
  its filter and deleted after it.

It knows subjects, payload bytes and sequences; runs, caches and hash chains are the
repository's (:mod:`interlock.core.eventstore.repository`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, ServiceUnavailableError
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from interlock.contracts import headers as h
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.core import codec
from interlock.core.eventstore.errors import Conflict, EventStoreError
from interlock.core.retry import Backoff, Retry

log = logging.getLogger("interlock.core.eventstore")

WRONG_LAST_SEQUENCE = 10071
# a clustered stream says the same with a constant error of its own ("wrong last sequence", no
# number): a conflict too, never a handler failure (which would wait for a redelivery backoff)
WRONG_LAST_SEQUENCE_CLUSTERED = 10164
DUPLICATE_IN_PROCESS = 10158  # a retry raced the first copy inside the cluster: try again
APPEND_BACKOFF = Backoff(first=0.05, cap=1.0)
# an append whose ack does not come in this long (its stream leader was killed) is checked and
# tried again (same msg id: stored once) instead of waiting out a longer timeout on a dead leader
APPEND_ACK_TIMEOUT_S = 2.0

# Headers of a direct-get reply, set by the server.
_STATUS = Header.STATUS.value
_DESCRIPTION = Header.DESCRIPTION.value
_SEQUENCE = h.SEQUENCE
_NUM_PENDING = h.NUM_PENDING
_LAST_SEQUENCE = h.LAST_SEQUENCE

APPENDED = "appended"
"""What an append records on the handler span it happened in (tracing exports such spans)."""
ACTED_ATTRIBUTE = "interlock.acted"
"""The span attribute listing what a handler did (appended, published, projected), in order:
attributes, not span events, since an event costs as much again to record and to export."""
_trace_context = TraceContextTextMapPropagator()

CONSUMER_EXISTS = 10148  # a create (action "create") of a name another reader holds
SLOT_IDLE_SECONDS = 30.0  # a slot consumer its reader abandoned (crash) is removed after this
_PULL_BATCH = 1000
_MULTI_LAST_MAX = 1024  # subjects of one filter read at most (a run's log has a handful)


def mark_acted(span: trace.Span, what: str, attributes: Mapping[str, Any] | None = None) -> None:
    """Record on ``span`` (if it records) that its handler did ``what``, with ``attributes``."""
    if not span.is_recording():
        return
    done = getattr(span, "attributes", None) or {}  # the SDK's span reads its attributes back
    span.set_attributes({**(attributes or {}), ACTED_ATTRIBUTE: (*done.get(ACTED_ATTRIBUTE, ()), what)})


# No ack: a stream-leader election, a reconnect, or the write landed and the ack was lost.
_NO_ACK = (nats.errors.TimeoutError, NoStreamResponseError, ServiceUnavailableError,
           nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError)


@dataclass
class StoredCommit:
    """One stored message of a run's log: its stream sequence and the event envelopes it holds.

    ``signer``/``signature``: its authorship headers; ``at``: when the server stored it (unix
    seconds, when known); ``problem``: why its bytes are not a commit (then ``envelopes`` is
    empty and ``raw`` holds them: an undecodable message is flagged, never fatal)."""

    stream_seq: int
    envelopes: list[dict[str, Any]]
    signer: str | None = None
    signature: str | None = None
    at: float | None = None
    problem: str | None = None
    raw: bytes | None = field(default=None, repr=False)
    headers: dict[str, str] | None = field(default=None, repr=False)


class SlotsBusy(EventStoreError):
    """Every consumer slot of the credential is held by another read (a watch, a load)."""


def _stored_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:  # nanosecond precision (RFC 3339 with 9 digits): cut to microseconds
        head, _, rest = value.partition(".")
        digits = "".join(ch for ch in rest if ch.isdigit())[:6]
        try:
            return datetime.fromisoformat(f"{head}.{digits or '0'}+00:00").timestamp()
        except ValueError:
            return None


def stored_commit(seq: int, data: bytes, headers: dict[str, str] | None, at: float | None = None) -> StoredCommit:
    """A stored message as a commit; bytes that are not one become a flagged entry."""
    headers = headers or {}
    signer, signature = headers.get(h.SIGNER), headers.get(h.SIGNATURE)
    if at is None:
        at = _stored_time(headers.get(h.TIMESTAMP))
    try:
        envelopes = codec.decode_commit_raw(data)["events"]
        if not all(isinstance(e, dict) for e in envelopes):
            raise ValueError("an entry of 'events' is not an object")
    except ValueError as e:  # msgspec's DecodeError is a ValueError
        return StoredCommit(seq, [], signer, signature, at, f"undecodable ({len(data)} bytes): {e}", data, headers)
    return StoredCommit(seq, envelopes, signer, signature, at, None, data, headers)




Decode = Callable[[int, bytes, dict[str, str] | None, float | None], StoredCommit]
"""(stream seq, bytes, headers, stored at) -> what a reader gets for a stored message."""


class JetStreamRecorder:
    """Appends to and reads from subjects of one stream. Safe for concurrent tasks.

    ``slots``: names of the consumers this credential may create (one filter each); given, reads
    go through them instead of direct gets."""

    def __init__(self, nc: NATS, js: JetStreamContext, *, stream: str = s.EVENTS_STREAM,
                 publish_timeout: float = 5.0, failover_patience: float = 30.0,
                 slots: Sequence[str] = (), decode: Decode | None = None) -> None:
        """``decode``: how a stored message becomes a :class:`StoredCommit` (default: a run commit;
        readers of other streams, such as alerts, pass their own)."""
        self._decode = decode or stored_commit
        self.nc = nc
        self.js = js
        self.stream = stream
        self.publish_timeout = publish_timeout
        self.failover_patience = failover_patience
        self._inbox: str | None = None
        self._request_no = 0
        self._replies: dict[str, asyncio.Queue[Msg]] = {}
        self.slots = tuple(slots)

    # -- reading -----------------------------------------------------------------------------
    async def read_commits(self, subject: str, after_seq: int = 0) -> list[StoredCommit]:
        """Every commit on ``subject`` after stream sequence ``after_seq``, in order."""
        if self.slots:
            async with contextlib.aclosing(self._through_slot(subject, after_seq, follow=False)) as read:
                return [commit async for commit in read if commit is not None]
        if any(token in ("*", ">") for token in subject.split(".")):
            return await self._read_filter(subject, after_seq)
        return await self._read_literal(subject, after_seq)

    async def _read_literal(self, subject: str, after_seq: int) -> list[StoredCommit]:
        commits: list[StoredCommit] = []
        start = after_seq + 1
        while True:
            batch, pending, last = await self._direct_get_batch(subject, start)
            commits.extend(batch)
            if pending == 0 or not batch:
                return commits
            start = max(last, batch[-1].stream_seq) + 1

    async def _read_filter(self, subject: str, after_seq: int) -> list[StoredCommit]:
        """The commits of a subject filter (a run's log: a few literal subjects, one per writer and
        route). A wildcard ``next_by_subj`` read makes the server look through the whole stream
        after the filter's last match, so the literal subjects are found first (their last messages,
        one ``multi_last`` request, answered from the subject index) and each is read literally."""
        lasts = await self._multi_last(subject)
        behind = [literal for literal, seq in lasts.items() if seq > after_seq]
        reads = await asyncio.gather(*(self._read_literal(literal, after_seq) for literal in behind))
        return sorted((commit for read in reads for commit in read), key=lambda c: c.stream_seq)

    async def _multi_last(self, subject: str) -> dict[str, int]:
        """The stream sequence of the last message on every subject matching ``subject``."""
        inbox = await self._reply_inbox()
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._replies[inbox] = queue
        try:
            request = json.dumps({"multi_last": [subject], "batch": _MULTI_LAST_MAX}).encode()
            await self.nc.publish(s.js_direct_get(self.stream), request, reply=inbox)
            lasts: dict[str, int] = {}
            while True:
                msg = await asyncio.wait_for(queue.get(), timeout=self.publish_timeout)
                headers = msg.headers or {}
                status = headers.get(_STATUS)
                if status in ("404", "204"):  # nothing matches / end of the batch
                    return lasts
                if status:
                    raise EventStoreError(f"direct get of the last messages of {subject} failed: {status} "
                                          f"{headers.get(_DESCRIPTION, '')}")
                lasts[headers[h.SUBJECT]] = int(headers[_SEQUENCE])
                if headers.get(_NUM_PENDING) == "0":  # the last one (an end-of-batch status may follow)
                    return lasts
        finally:
            del self._replies[inbox]

    async def _reply_inbox(self) -> str:
        """One wildcard inbox subscription for every direct get this recorder makes (no SUB/UNSUB
        round per load)."""
        if self._inbox is None:
            prefix = self.nc.new_inbox()

            async def route(msg: Msg) -> None:
                queue = self._replies.get(msg.subject)
                if queue is not None:
                    queue.put_nowait(msg)

            await self.nc.subscribe(f"{prefix}.*", cb=route)
            self._inbox = prefix
        self._request_no += 1
        return f"{self._inbox}.{self._request_no}"

    async def _direct_get_batch(self, subject: str, start: int, size: int = 10_000
                                ) -> tuple[list[StoredCommit], int, int]:
        """Up to ``size`` commits from ``start`` on, the number still pending, the last sequence."""
        inbox = await self._reply_inbox()
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._replies[inbox] = queue
        try:
            request = json.dumps({"seq": start, "next_by_subj": subject, "batch": size}).encode()
            await self.nc.publish(s.js_direct_get(self.stream), request, reply=inbox)
            commits: list[StoredCommit] = []
            while True:
                msg = await asyncio.wait_for(queue.get(), timeout=self.publish_timeout)
                headers = msg.headers or {}
                status = headers.get(_STATUS)
                if status:
                    if status == "404":  # nothing on the subject from `start` on
                        return commits, 0, 0
                    if status == "204":  # end of batch
                        return (commits, int(headers.get(_NUM_PENDING, "0")),
                                int(headers.get(_LAST_SEQUENCE, "0")))
                    raise EventStoreError(f"direct get on {subject} failed: {status} "
                                          f"{headers.get(_DESCRIPTION, '')}")
                commits.append(self._decode(int(headers[_SEQUENCE]), msg.data, dict(headers), None))
        finally:
            del self._replies[inbox]

    def follow(self, subject: str, after_seq: int = 0, idle: float = 1.0) -> AsyncGenerator[StoredCommit | None, None]:
        """Every commit on ``subject`` after ``after_seq`` as it is appended, through a slot
        consumer held until the caller closes the generator (``contextlib.aclosing``); None after
        each ``idle`` seconds without one."""
        return self._through_slot(subject, after_seq, follow=True, idle=idle)

    async def _through_slot(self, subject: str, after_seq: int, *, follow: bool, idle: float = 1.0
                            ) -> AsyncGenerator[StoredCommit | None, None]:
        name, pending = await self._take_slot(subject, after_seq)
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            while follow or pending:
                expires = idle if follow else self.publish_timeout
                request = {"batch": _PULL_BATCH, "expires": int(expires * 1e9)}
                await self.nc.publish(s.js_consumer_next(self.stream, name), json.dumps(request).encode(), reply=inbox)
                for _ in range(_PULL_BATCH):
                    try:
                        msg = await sub.next_msg(timeout=expires + self.publish_timeout)
                    except nats.errors.TimeoutError:
                        raise EventStoreError(f"consumer {name} on {self.stream} sent nothing for "
                                              f"{expires + self.publish_timeout:g}s") from None
                    status = (msg.headers or {}).get(_STATUS)
                    if status:  # 408: the pull expired; 409: the consumer went away (deleted, idle)
                        if status != "408" or not follow:
                            raise EventStoreError(f"reading {subject} through consumer {name} failed: {status} "
                                                  f"{(msg.headers or {}).get(_DESCRIPTION, '')}")
                        yield None
                        break
                    meta = msg.metadata
                    pending = meta.num_pending
                    yield self._decode(meta.sequence.stream, msg.data, dict(msg.headers or {}),
                                       meta.timestamp.timestamp())
                    if not (follow or pending):
                        return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await self.nc.request(p.js_consumer_delete(self.stream, name), b"", timeout=self.publish_timeout)

    async def _take_slot(self, subject: str, after_seq: int) -> tuple[str, int]:
        """Create a consumer of ``subject`` under the first free slot name: (name, commits pending).
        A create with action "create" fails on a name in use, so concurrent readers never share one."""
        tag = uuid.uuid4().hex  # two readers of the same subject must still differ in config
        for name in self.slots:
            config = {"name": name, "filter_subject": subject, "ack_policy": "none", "mem_storage": True,
                      "inactive_threshold": int(SLOT_IDLE_SECONDS * 1e9), "description": f"read {tag}",
                      **({"deliver_policy": "by_start_sequence", "opt_start_seq": after_seq + 1}
                         if after_seq else {"deliver_policy": "all"})}
            request = {"stream_name": self.stream, "config": config, "action": "create"}
            reply = await self.nc.request(p.js_filtered_consumer_create(self.stream, subject, name),
                                          json.dumps(request).encode(), timeout=self.publish_timeout)
            info = json.loads(reply.data)
            error = info.get("error")
            if error is None:
                return name, int(info.get("num_pending", 0))
            if error.get("err_code") != CONSUMER_EXISTS:
                raise EventStoreError(f"cannot create consumer {name} of {subject}: {error.get('description')}")
        raise SlotsBusy(f"all {len(self.slots)} consumers this credential may read {self.stream} through "
                        f"({', '.join(self.slots)}) are in use by other reads (watches, loads); end one, or wait "
                        f"{SLOT_IDLE_SECONDS:g}s for an abandoned one to be removed")

    # -- writing -----------------------------------------------------------------------------
    async def append(self, subject: str, payload: bytes, msg_id: str, expected_seq: int,
                     extra_headers: dict[str, str] | None = None, *, condition_on: str | None = None) -> int:
        """Publish ``payload`` if the subject's last message is still at ``expected_seq``
        (``condition_on``: the last message of that subject filter instead, e.g. a run's log).

        Returns the stream sequence it was stored at (also when an earlier try of the same
        ``msg_id`` landed and only its ack was lost). Raises :class:`Conflict` when another
        writer appended first, :class:`EventStoreError` when no ack came for ``failover_patience``.
        """
        headers = {h.MSG_ID: msg_id, h.EXPECTED_LAST_SUBJECT_SEQ: str(expected_seq), **(extra_headers or {})}
        if condition_on is not None:
            headers[h.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = condition_on
        span = trace.get_current_span()
        if span.get_span_context().is_valid:  # services that read the commit continue this span's trace
            _trace_context.inject(headers)
        seq = await self._append(subject, payload, msg_id, headers, condition_on or subject)
        mark_acted(span, APPENDED, {"interlock.appended_seq": seq})
        return seq

    async def _append(self, subject: str, payload: bytes, msg_id: str, headers: dict[str, str],
                      condition_on: str) -> int:
        retry = Retry(APPEND_BACKOFF, patience=self.failover_patience)
        while True:
            try:
                ack = await self.js.publish(subject, payload, headers=headers,
                                            timeout=min(self.publish_timeout, APPEND_ACK_TIMEOUT_S))
                return int(ack.seq)
            except BadRequestError as e:
                if e.err_code in (WRONG_LAST_SEQUENCE, WRONG_LAST_SEQUENCE_CLUSTERED):
                    # maybe our own earlier try landed (ambiguous timeout, then a retry)
                    landed = await self._landed(condition_on, msg_id)
                    if landed is not None:
                        return landed
                    raise Conflict() from None
                if e.err_code != DUPLICATE_IN_PROCESS or retry.exhausted:
                    raise
                # our first copy is still being stored: ask again
            except _NO_ACK as e:
                # find out whether it landed before trying again
                landed = await self._landed(condition_on, msg_id)
                if landed is not None:
                    return landed
                if retry.exhausted:
                    raise EventStoreError(f"append to {subject} failed for {self.failover_patience}s: {e!r}"
                                          ) from e
                log.warning("append to %s not acknowledged (%r); retrying", subject, e)
            except APIError as e:  # e.g. 10158 "duplicate message id is in process" in a cluster
                if retry.exhausted:
                    raise
                log.warning("append to %s failed (%r); retrying", subject, e)
            await retry.wait()

    async def _landed(self, subject: str, msg_id: str) -> int | None:
        """Stream sequence of the subject's last message if it carries ``msg_id``."""
        try:
            msg = await self.js.get_last_msg(self.stream, subject, direct=True)
        except Exception:
            return None
        if msg.headers and msg.headers.get(h.MSG_ID) == msg_id and msg.seq is not None:
            return int(msg.seq)
        return None
