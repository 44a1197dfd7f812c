"""Who changed which stream or consumer: the server's JetStream API audit, kept in ``IL_ADMIN_AUDIT``.

nats-server publishes an advisory (:class:`~interlock.contracts.messages.JsApiAudit`) for every
JetStream API request it answers; the topology's ``IL_ADMIN_AUDIT`` stream keeps them (no purge,
no message delete, a year). :func:`admin_changes` reads the stream back and keeps the requests
that change something (stream create/update/delete/purge, message delete, restore, account purge;
consumer changes on request), with the principal that asked, the request and the outcome.

Reading uses batched direct gets: it creates no consumer, so listing the record adds nothing to it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import Header
from pydantic import ValidationError

from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.contracts.messages import JsApiAudit

BATCH = 1000


class AdminAuditError(RuntimeError):
    """The audit stream cannot be read (missing, or the server refused)."""


@dataclass(frozen=True)
class AdminChange:
    """One JetStream API request that changed a stream or consumer, as the server recorded it."""

    seq: int
    at: datetime
    principal: str
    """The user JWT's name (the Interlock principal); else the user (public key); else ``anonymous``."""
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
    request: Any
    """The request body (JSON, parsed), None when the request had none."""
    ok: bool
    error: str
    server: str
    config: dict[str, Any] | None = None
    """For a stream create or update the server accepted: the configuration as it stored it."""
    changed: dict[str, tuple[Any, Any]] | None = None
    """For a stream update: each setting it changed, (before, after), against the stream's previous
    create or update in the record; None when the record does not hold that one."""

    @property
    def what(self) -> str:
        """``STREAM.UPDATE IL_EVENTS``, ``CONSUMER.DELETE IL_JOBS/worker_x``."""
        target = f"{self.stream}/{self.consumer}" if self.consumer else self.stream
        return f"{self.kind}.{self.action} {target}".rstrip()


def _json(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def change_from_advisory(seq: int, advisory: JsApiAudit) -> AdminChange | None:
    """The change an advisory records; None for a request outside the JetStream API."""
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
    )


_NOT_SETTINGS = ("created", "metadata")  # set by the server, not by the request


def _with_changes(change: AdminChange, configs: dict[str, dict[str, Any]]) -> AdminChange:
    """``change`` with the settings it changed (for a stream update whose previous configuration is
    known), remembering each stream's configuration from its creates and updates as they pass."""
    if change.kind != "STREAM" or not change.ok:
        return change
    if change.action == "DELETE":
        configs.pop(change.stream, None)
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


async def admin_changes(nc: NATS, *, since: datetime | None = None, stream: str | None = None,
                        consumers: bool = False, failed: bool = True, timeout: float = 5.0) -> list[AdminChange]:
    """Every recorded request that changed a stream (and, with ``consumers``, a consumer), oldest
    first; from ``since`` on, about ``stream`` only, refused ones too unless ``failed`` is False."""
    request: dict[str, Any] = {"batch": BATCH}
    if since is not None:
        request["start_time"] = since.isoformat()
    else:
        request["seq"] = 1
    out: list[AdminChange] = []
    configs: dict[str, dict[str, Any]] = {}
    while True:
        msgs, pending = await _batch(nc, request, timeout)
        for msg in msgs:
            seq = int((msg.headers or {}).get(h.SEQUENCE, "0"))
            try:
                advisory = JsApiAudit.model_validate_json(msg.data)
            except ValidationError:
                continue  # not an advisory (the stream takes whatever is published on the subject)
            change = change_from_advisory(seq, advisory)
            if change is None or not s.JsApiCall(change.kind, change.action).changes:
                continue  # a read (INFO, LIST, …)
            change = _with_changes(change, configs)
            if ((change.kind == "CONSUMER" and not consumers) or (stream and change.stream != stream)
                    or not (failed or change.ok)):
                continue
            out.append(change)
        if not msgs or pending == 0:
            return out
        request = {"batch": BATCH, "seq": int((msgs[-1].headers or {}).get(h.SEQUENCE, "0")) + 1}
