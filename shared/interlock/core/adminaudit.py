"""Who changed which stream: the record in ``IL_ADMIN_AUDIT``, written and read.

Two sources fill the stream, because each misses what the other has:

- ``il.admin.audit``: the auditor service subscribes to the server's JetStream API audit
  advisories (one for *every* API request, reads included: far too many to keep) and stores
  those of requests that change a stream or the account (:func:`record_for`): who asked (the
  client: principal, user key, account, connection), the request and the answer. Consumer
  changes are not recorded: ordered consumers come and go with every ``watch``, so they would
  bury the stream changes. While no auditor runs, nothing is written here.
- ``$JS.EVENT.ADVISORY.STREAM.{CREATED,UPDATED,DELETED}.{stream}``: the server's own stream
  action advisories, captured by the stream itself, so a create, update or delete is recorded
  even when no Interlock service runs. They name no client, and purges and message deletes have
  none.

:func:`admin_changes` reads both back: each auditor record as a change with its principal; a
stream action with no auditor record of the same request (no auditor was running) with the
principal :data:`UNKNOWN_PRINCIPAL`. Reading uses batched direct gets: it creates no consumer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import Header
from pydantic import ValidationError

from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.contracts.messages import AdminAuditRecord, AdvisoryTruncation, JsApiAudit, JsStreamAction
from interlock.core.topology import ADMIN_AUDIT_MAX_MSG

BATCH = 1000
RECORDED_KINDS = ("STREAM", "ACCOUNT")
"""API kinds whose changes the auditor records (not CONSUMER: ordered consumers come and go with
every ``watch``)."""
RECORD_LIMIT = ADMIN_AUDIT_MAX_MSG - 1024
"""The largest record body: the stream's maximum message size less room for the headers."""
UNKNOWN_PRINCIPAL = "unknown (no auditor was running)"
MATCH_WINDOW = timedelta(seconds=10)
"""How far apart (server clock) a stream action advisory and the API audit of its request may be."""
_API_ACTIONS = {"create": ("CREATE", "RESTORE"), "modify": ("UPDATE",), "delete": ("DELETE",)}
"""The ``$JS.API.STREAM.{action}`` requests a stream action advisory's ``action`` can follow."""


class AdminAuditError(RuntimeError):
    """The audit stream cannot be read (missing, or the server refused)."""


# -- writing (the auditor service) -------------------------------------------------------------
class Record(NamedTuple):
    """What the auditor publishes to ``il.admin.audit`` for one advisory."""

    body: bytes
    msg_id: str
    """sha256 (hex) of the advisory as received: copies and retries are stored once."""
    truncated: bool


def records(call: s.JsApiCall | None) -> bool:
    """True for an API call the auditor records: a change of a stream or the account."""
    return call is not None and call.kind in RECORDED_KINDS and call.changes


# the server writes the advisory's subject before its request and response: reading it from the
# first bytes spares parsing the whole of the (many, sometimes large) advisories that are not kept.
# No other key of the advisory is "subject" (the client record has none; request and response are
# strings, their quotes escaped)
_SUBJECT = re.compile(rb'"subject"\s*:\s*"([^"\\]*)"')
_HEAD = 16 * 1024


def record_for(advisory: bytes, limit: int = RECORD_LIMIT) -> Record | None:
    """The record of an API audit advisory that changes a stream or the account; None for any
    other request (reads, consumer changes). An advisory larger than ``limit`` is shortened (the
    request and the response cut, the longer first) and says so, with its size and sha256.
    Raises ValueError for bytes that are not an API audit advisory."""
    head = _SUBJECT.search(advisory, 0, _HEAD)
    if head is not None and not records(s.parse_js_api(head.group(1).decode(errors="replace"))):
        return None  # most advisories are reads, some of megabytes (a stream info with every subject)
    try:
        parsed = JsApiAudit.model_validate_json(advisory)
    except ValidationError as e:
        raise ValueError(f"not a JetStream API audit advisory: {e.errors()[0]['msg']}") from None
    if not records(s.parse_js_api(parsed.subject)):
        return None
    digest = hashlib.sha256(advisory).hexdigest()
    if len(advisory) <= limit:
        return Record(advisory, digest, False)
    return Record(_shortened(advisory, digest, limit), digest, True)


def _shortened(advisory: bytes, digest: str, limit: int) -> bytes:
    """The advisory as JSON no longer than ``limit``, ``request``/``response`` cut, ``truncated`` set."""
    doc: dict[str, Any] = json.loads(advisory)
    cut: list[str] = []

    def encoded() -> bytes:
        truncation = AdvisoryTruncation(size=len(advisory), sha256=digest, fields=sorted(cut))
        return json.dumps({**doc, "truncated": truncation.model_dump(mode="json")}, ensure_ascii=False).encode()

    body = encoded()
    while len(body) > limit:
        fields = [f for f in ("response", "request") if isinstance(doc.get(f), str) and doc[f]]
        if not fields:  # nothing left to cut (a huge client record?): keep who and what
            doc = {k: doc.get(k) for k in ("type", "id", "timestamp", "server", "client", "subject")}
            return encoded()
        longest = max(fields, key=lambda f: len(doc[f]))
        value: str = doc[longest]
        over = len(body) - limit
        # JSON escaping (a JSON text inside a string) can double a character's size: cut generously
        doc[longest] = value[:max(0, len(value) - max(over, len(value) // 8))]
        if longest not in cut:
            cut.append(longest)
        body = encoded()
    return body


# -- reading -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdminChange:
    """One change to a stream or the account, as recorded."""

    seq: int
    at: datetime
    principal: str
    """The user JWT's name (the Interlock principal); else the user (public key); else ``anonymous``;
    :data:`UNKNOWN_PRINCIPAL` for a change only the server's stream action advisory records."""
    user: str
    account: str
    connection: str
    """The connection's name: a client option, not authenticated."""
    host: str
    cid: int | None
    """The connection's id on ``server``."""
    kind: str
    action: str
    stream: str
    consumer: str
    subject: str
    """The API subject of the request (the advisory's subject for a server-only record)."""
    request: Any
    """The request body (JSON, parsed), None when the request had none (or is not known)."""
    ok: bool
    error: str
    server: str
    config: dict[str, Any] | None = None
    """For a stream create or update the server accepted: the configuration as it stored it."""
    changed: dict[str, tuple[Any, Any]] | None = None
    """For a stream update: each setting it changed, (before, after), against the stream's previous
    create or update in the record; None when the record does not hold that one."""
    truncated: AdvisoryTruncation | None = None
    """Set when the advisory was too large to keep whole (request or response cut)."""

    @property
    def what(self) -> str:
        """``STREAM.UPDATE IL_EVENTS``, ``ACCOUNT.PURGE``."""
        target = f"{self.stream}/{self.consumer}" if self.consumer else self.stream
        return f"{self.kind}.{self.action} {target}".rstrip()


def _json(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text  # a cut (truncated) body is no longer JSON: keep its text


def change_from_advisory(seq: int, advisory: JsApiAudit) -> AdminChange | None:
    """The change an API audit advisory records; None for a request outside the JetStream API."""
    call = s.parse_js_api(advisory.subject)
    if call is None:
        return None
    client = advisory.client
    response = _json(advisory.response)
    if not isinstance(response, dict):
        response = {}
    error, config = response.get("error"), response.get("config")
    return AdminChange(
        seq=seq, at=advisory.timestamp,
        principal=(client and (client.name_tag or client.user)) or "anonymous",
        user=client.user if client else "", account=client.acc if client else "",
        connection=client.name if client else "", host=client.host if client else "",
        cid=client.id if client else None,
        kind=call.kind, action=call.action, stream=call.stream, consumer=call.consumer,
        subject=advisory.subject, request=_json(advisory.request),
        ok=error is None, error=(error.get("description") or str(error)) if isinstance(error, dict) else "",
        server=advisory.server,
        config=config if error is None and isinstance(config, dict) else None,
        truncated=advisory.truncated if isinstance(advisory, AdminAuditRecord) else None,
    )


def change_from_stream_action(seq: int, action: JsStreamAction) -> AdminChange:
    """A change only the server's stream action advisory records: who asked is not known."""
    api = _API_ACTIONS.get(action.action, (action.action.upper(),))[0]
    event = next((e for e, a in s.JS_STREAM_ACTIONS.items() if a == action.action), action.action.upper())
    return AdminChange(
        seq=seq, at=action.timestamp, principal=UNKNOWN_PRINCIPAL, user="", account="", connection="", host="",
        cid=None, kind="STREAM", action=api, stream=action.stream, consumer="",
        subject=s.js_stream_action(event, action.stream), request=None, ok=True, error="", server="")


def _matches(action: JsStreamAction, change: AdminChange) -> bool:
    return (change.kind == "STREAM" and change.ok and change.stream == action.stream
            and change.action in _API_ACTIONS.get(action.action, ())
            and abs(change.at - action.timestamp) <= MATCH_WINDOW)


def merge(changes: list[AdminChange], actions: list[tuple[int, JsStreamAction]]) -> list[AdminChange]:
    """The auditor's records, and a change for each stream action no record accounts for (each
    record accounts for at most one, the nearest in time); oldest first.

    A server announces every stream it restores from its store at start-up as created: a create
    advisory for a stream the record already holds (created, not deleted since) is that, not a
    change, and is left out.
    """
    unclaimed = list(changes)
    out = list(changes)
    exists: set[str] = set()
    timeline: list[tuple[datetime, int, AdminChange | JsStreamAction]] = sorted(
        [(c.at, c.seq, c) for c in changes] + [(a.timestamp, seq, a) for seq, a in actions], key=lambda x: x[:2])
    for _, seq, item in timeline:
        if isinstance(item, AdminChange):
            if item.kind == "STREAM" and item.ok and item.action in ("CREATE", "RESTORE"):
                exists.add(item.stream)
            elif item.kind == "STREAM" and item.ok and item.action == "DELETE":
                exists.discard(item.stream)
            continue
        candidates = [c for c in unclaimed if _matches(item, c)]
        if candidates:
            unclaimed.remove(min(candidates, key=lambda c: abs(c.at - item.timestamp)))
        elif not (item.action == "create" and item.stream in exists):  # else: restored at a server start
            out.append(change_from_stream_action(seq, item))
        if item.action == "create":
            exists.add(item.stream)
        elif item.action == "delete":
            exists.discard(item.stream)
    return sorted(out, key=lambda c: (c.at, c.seq))


_NOT_SETTINGS = ("created", "metadata")  # set by the server, not by the request


def _with_changes(change: AdminChange, configs: dict[str, dict[str, Any]]) -> AdminChange:
    """``change`` with the settings it changed (for a stream update whose previous configuration is
    known), remembering each stream's configuration from its creates and updates as they pass."""
    if change.kind != "STREAM" or not change.ok:
        return change
    if change.action == "DELETE" or (change.action == "UPDATE" and change.config is None):
        configs.pop(change.stream, None)  # gone, or changed in a way the record does not show
        return change
    if change.action not in ("CREATE", "UPDATE") or change.config is None:
        return change
    before, after = configs.get(change.stream), change.config
    configs[change.stream] = after
    if change.action != "UPDATE" or before is None:
        return change
    keys = [k for k in dict.fromkeys([*before, *after]) if k not in _NOT_SETTINGS]
    return replace(change, changed={k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)})


async def _batch(nc: NATS, request: dict[str, Any], timeout: float) -> tuple[list[Msg], int]:
    """One batched direct get on the audit stream: the messages and how many are left after them."""
    inbox = nc.new_inbox()
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def collect(msg: Msg) -> None:
        queue.put_nowait(msg)

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(s.js_direct_get(s.ADMIN_AUDIT_STREAM), json.dumps(request).encode(), reply=inbox)
        out: list[Msg] = []
        while True:
            try:
                msg = await asyncio.wait_for(queue.get(), timeout=timeout)
            except TimeoutError:
                raise AdminAuditError(f"no answer from stream {s.ADMIN_AUDIT_STREAM} within {timeout}s: not "
                                      "provisioned, or the connection may not read it (admin may)") from None
            status = (msg.headers or {}).get(Header.STATUS.value)
            if status == "404":
                return out, 0
            if status == "204":
                return out, int((msg.headers or {}).get(h.NUM_PENDING, "0"))
            if status:
                raise AdminAuditError(f"reading {s.ADMIN_AUDIT_STREAM} failed: {status} "
                                      f"{(msg.headers or {}).get(Header.DESCRIPTION.value, '')}".rstrip())
            out.append(msg)
    finally:
        await sub.unsubscribe()


def _decode(seq: int, data: bytes) -> AdminChange | tuple[int, JsStreamAction] | None:
    """One stored message: an API audit record's change, a stream action, or None (anything else)."""
    try:
        kind = json.loads(data).get("type")
        if kind == s.JS_API_AUDIT_TYPE:
            return change_from_advisory(seq, AdminAuditRecord.model_validate_json(data))
        if kind == s.JS_STREAM_ACTION_TYPE:
            return seq, JsStreamAction.model_validate_json(data)
    except (ValueError, AttributeError):
        pass  # not JSON, not an object, or not valid: the stream takes whatever is published on its subjects
    return None


async def _read(nc: NATS, timeout: float) -> list[AdminChange]:
    request: dict[str, Any] = {"batch": BATCH, "seq": 1}
    changes: list[AdminChange] = []
    actions: list[tuple[int, JsStreamAction]] = []
    while True:
        msgs, pending = await _batch(nc, request, timeout)
        for msg in msgs:
            item = _decode(int((msg.headers or {}).get(h.SEQUENCE, "0")), msg.data)
            if isinstance(item, AdminChange):
                # older releases stored every API advisory: keep the recorded kinds' changes only
                if records(s.JsApiCall(item.kind, item.action)):
                    changes.append(item)
            elif item is not None:
                actions.append(item)
        if not msgs or pending == 0:
            return merge(changes, actions)
        request = {"batch": BATCH, "seq": int((msgs[-1].headers or {}).get(h.SEQUENCE, "0")) + 1}


async def admin_changes(nc: NATS, *, since: datetime | None = None, stream: str | None = None,
                        failed: bool = True, timeout: float = 5.0) -> list[AdminChange]:
    """Every recorded change to a stream or the account, oldest first; from ``since`` on, about
    ``stream`` only, refused ones too unless ``failed`` is False. Consumer changes are not recorded."""
    # the whole record, whatever ``since`` says: a stream's earlier create and configuration tell
    # a restart's advisories from changes, and what an update changed (it holds changes only)
    changes = await _read(nc, timeout)
    out: list[AdminChange] = []
    configs: dict[str, dict[str, Any]] = {}
    for change in changes:
        change = _with_changes(change, configs)
        if ((since is not None and change.at < since) or (stream and change.stream != stream)
                or not (failed or change.ok)):
            continue
        out.append(change)
    return out
