"""The admin's changes to stream configuration are recorded (issue 10), on a real nats-server.

The session's server (with or without auth: the connection is the session's) keeps the server's
JetStream API audit advisories in ``IL_ADMIN_AUDIT``. An update of ``IL_EVENTS`` (its max_age), a
refused purge of it and the delete of a scratch stream must each be in that stream, with who made
the request (this very connection, and its principal when it holds a credential), the request and
the outcome; ``interlock audit admin-changes`` must list them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig
from nats.js.errors import APIError
from typer.testing import CliRunner

from interlock.cli import app
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.core.adminaudit import AdminChange, admin_changes
from interlock.identity import decode_jwt, read_creds

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

RECORD_TIMEOUT_S = 10.0
NS = 1_000_000_000


async def recorded(nc: NATS, since: datetime, wanted: dict[str, str]) -> dict[str, AdminChange]:
    """Wait until a change of each ``what`` in ``wanted`` made by this connection is recorded;
    fail naming what is missing and what was found."""
    deadline = time.monotonic() + RECORD_TIMEOUT_S
    while True:
        mine = [c for c in await admin_changes(nc, since=since) if c.cid == nc.client_id]
        found = {key: next((c for c in mine if c.what == what), None) for key, what in wanted.items()}
        if all(found.values()):
            return {key: c for key, c in found.items() if c is not None}
        if time.monotonic() > deadline:
            missing = [wanted[k] for k, c in found.items() if c is None]
            raise AssertionError(f"not recorded within {RECORD_TIMEOUT_S}s: {missing}; "
                                 f"recorded for this connection: {[c.what for c in mine]}")
        await asyncio.sleep(0.05)


def connection_creds(nc: NATS) -> Path | None:
    """The .creds file the session's connection authenticated with (nats-py keeps it privately)."""
    creds = getattr(nc, "_user_credentials", None)
    return Path(creds) if isinstance(creds, str | Path) else None


def expected_principal(nc: NATS) -> tuple[str, str]:
    """(principal, user public key) the server should report for this connection."""
    creds = connection_creds(nc)
    if creds is None:
        return "anonymous", ""
    token, key = read_creds(creds)
    return str(decode_jwt(token)["name"]), key.public_key


async def test_stream_changes_are_recorded_with_who_what_and_outcome(nc: NATS) -> None:
    js = nc.jetstream()
    audit = await js.stream_info(s.ADMIN_AUDIT_STREAM)
    assert audit.config.subjects == [s.JS_API_AUDIT]
    assert audit.config.deny_delete and audit.config.deny_purge
    assert (audit.config.max_age or 0) >= 365 * 24 * 3600

    since = datetime.now(UTC) - timedelta(seconds=2)  # the server's clock is this machine's
    events = (await js.stream_info(s.EVENTS_STREAM)).config
    new_age = 3650 * 24 * 3600.0 if not events.max_age else events.max_age + 3600
    scratch = f"ADMIN_AUDIT_SCRATCH_{uuid.uuid4().hex[:8]}"
    try:
        await js.update_stream(replace(events, max_age=new_age))
        with pytest.raises(APIError):
            await js.purge_stream(s.EVENTS_STREAM)  # deny_purge: refused, and the attempt recorded
        await js.add_stream(StreamConfig(name=scratch, subjects=[f"{scratch}.>"]))
        await js.delete_stream(scratch)
    finally:
        await js.update_stream(events)  # the session's IL_EVENTS as it was
    assert (await js.stream_info(s.EVENTS_STREAM)).config.max_age == events.max_age

    found = await recorded(nc, since, {
        "update": f"STREAM.UPDATE {s.EVENTS_STREAM}",
        "purge": f"STREAM.PURGE {s.EVENTS_STREAM}",
        "create": f"STREAM.CREATE {scratch}",
        "delete": f"STREAM.DELETE {scratch}",
    })
    principal, user = expected_principal(nc)
    for change in found.values():
        assert (change.principal, change.user) == (principal, user)
        assert change.at >= since
    update = found["update"]
    assert update.ok and update.request["name"] == s.EVENTS_STREAM
    assert update.request["max_age"] == int(new_age * NS)  # the request as sent, in nanoseconds
    assert update.config is not None and update.config["max_age"] == int(new_age * NS)  # as the server stored it
    assert not found["purge"].ok and found["purge"].error
    # against the whole record (IL_EVENTS's creation is in it: the audit stream is provisioned
    # first), the update changed exactly one setting
    whole = {c.seq: c for c in await admin_changes(nc, stream=s.EVENTS_STREAM)}
    assert whole[update.seq].changed == {"max_age": (int((events.max_age or 0) * NS), int(new_age * NS))}
    assert found["delete"].ok and found["delete"].request is None  # a delete has no body
    assert found["create"].ok and found["create"].request["subjects"] == [f"{scratch}.>"]

    # reads are recorded too, but are not changes: the stream infos above are not listed
    assert not [c for c in await admin_changes(nc, since=since) if c.action == "INFO"]
    only_events = await admin_changes(nc, since=since, stream=s.EVENTS_STREAM)
    assert {c.stream for c in only_events} == {s.EVENTS_STREAM}
    assert not [c for c in await admin_changes(nc, since=since, failed=False) if not c.ok]

    # the CLI lists them: when, who, what, the request
    url = nc.connected_url
    assert url is not None
    args = ["--nats", f"nats://{url.hostname}:{url.port}", "audit", "admin-changes", "--since", since.isoformat()]
    creds = connection_creds(nc)
    if creds is not None:
        args += ["--creds", str(creds)]
    result = await asyncio.to_thread(CliRunner().invoke, app, [*args, "-o", "json"])
    assert result.exit_code == 0, result.output
    rows = {(row["what"], row["seq"]): row for row in json.loads(result.stdout)}
    for change in found.values():
        row = rows[(change.what, change.seq)]
        assert row["who"] == principal and row["subject"] == change.subject
        assert datetime.fromisoformat(row["when"]) == change.at
        assert row["request"] == change.request
    assert rows[(found["purge"].what, found["purge"].seq)]["outcome"].startswith("refused")

    table = await asyncio.to_thread(CliRunner().invoke, app, args, env={"COLUMNS": "400"})
    assert table.exit_code == 0, table.output
    assert f"STREAM.DELETE {scratch}" in table.stdout and f"STREAM.UPDATE {s.EVENTS_STREAM}" in table.stdout
    assert "max_age:" in table.stdout or "max_age=" in table.stdout  # the update's setting (changed or request)


async def test_the_record_itself_cannot_be_purged_or_its_messages_deleted(nc: NATS) -> None:
    js = nc.jetstream()
    before = (await js.stream_info(s.ADMIN_AUDIT_STREAM)).state
    assert before.messages > 0  # at least its own creation is in it
    with pytest.raises(APIError):
        await js.purge_stream(s.ADMIN_AUDIT_STREAM)
    with pytest.raises(APIError):
        await js.delete_msg(s.ADMIN_AUDIT_STREAM, before.first_seq)
    after = (await js.stream_info(s.ADMIN_AUDIT_STREAM)).state
    assert after.first_seq == before.first_seq and after.messages >= before.messages


@pytest.mark.parametrize(("subject", "call", "changes"), [
    (p.js_stream("UPDATE", s.EVENTS_STREAM), s.JsApiCall("STREAM", "UPDATE", s.EVENTS_STREAM), True),
    (p.js_stream("MSG.DELETE", s.EVENTS_STREAM), s.JsApiCall("STREAM", "MSG.DELETE", s.EVENTS_STREAM), True),
    (p.js_stream_info(s.EVENTS_STREAM), s.JsApiCall("STREAM", "INFO", s.EVENTS_STREAM), False),
    (p.js_consumer_info(s.JOBS_STREAM, "w"), s.JsApiCall("CONSUMER", "INFO", s.JOBS_STREAM, "w"), False),
    (s.js_consumer_next(s.JOBS_STREAM, "w"), s.JsApiCall("CONSUMER", "MSG.NEXT", s.JOBS_STREAM, "w"), False),
    (p.js_filtered_consumer_create(s.JOBS_STREAM, s.job("acme", "a.b"), "w"),
     s.JsApiCall("CONSUMER", "CREATE", s.JOBS_STREAM, "w"), True),
    (s.JS_API_INFO, s.JsApiCall("INFO", ""), False),
])
def test_api_subjects_are_read_as_calls(subject: str, call: s.JsApiCall, changes: bool) -> None:
    assert s.parse_js_api(subject) == call
    assert call.changes is changes


def test_a_subject_outside_the_api_is_no_call() -> None:
    assert s.parse_js_api(s.run_events("acme", "r1")) is None
