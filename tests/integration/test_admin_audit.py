"""The admin's changes to stream configuration are recorded (issue 10), on a real nats-server.

``IL_ADMIN_AUDIT`` keeps the auditor's ``il.admin.audit`` records (the server's API audit
advisories of requests that change a stream: who, the request, the answer) and the server's own
stream action advisories. With an auditor running, an update of ``IL_EVENTS``, a refused purge
of it and a scratch stream's create and delete are each listed with this connection as who
asked, the request and the outcome; reads (stream info, consumer create and info) add nothing
to the stream. With no auditor running a stream's create, update and delete are still listed,
who being unknown. Two auditor copies store a change once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import APIError
from typer.testing import CliRunner

from interlock.auditor.service import AuditorService
from interlock.cli import app
from interlock.contracts import catalog as c
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.contracts.messages import AdminAuditRecord
from interlock.core import adminaudit
from interlock.core.adminaudit import UNKNOWN_PRINCIPAL, AdminChange, admin_changes, record_for
from interlock.core.natsserver import EmbeddedNats
from interlock.core.topology import provision
from interlock.identity import IdentityHome, creds_inbox_prefix, decode_jwt, read_creds
from interlock.runtime.connect import connect
from interlock.runtime.settings import ServiceSettings
from tests.principals import Principals

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

RECORD_TIMEOUT_S = 10.0
NS = 1_000_000_000


def scratch_name(what: str) -> str:
    return f"ADMIN_AUDIT_{what}_{uuid.uuid4().hex[:8]}"


AUDITOR_CREDS: list[Path] = []  # the session's auditor credential, set by the autouse fixture below


@pytest.fixture(autouse=True)
def auditor_creds(principals: Principals) -> None:
    AUDITOR_CREDS[:] = [principals.service(c.AUDITOR)]


@asynccontextmanager
async def auditors(url: str, copies: int = 1) -> AsyncIterator[list[AuditorService]]:
    """``copies`` auditor services on the session's server (in-memory projections), stopped after."""
    running: list[AuditorService] = []
    try:
        for _ in range(copies):
            settings = ServiceSettings(nats_url=url, provision=False, sweep_interval=0, creds=AUDITOR_CREDS[0])
            service = AuditorService(settings, db_path=":memory:", instance=f"adminaudit-{uuid.uuid4().hex[:8]}")
            await service.start()
            running.append(service)
        yield running
    finally:
        for service in running:
            await service.stop()


async def recorded(nc: NATS, since: datetime, wanted: dict[str, str], *, mine: bool = True) -> dict[str, AdminChange]:
    """Wait until a change of each ``what`` in ``wanted`` is listed (made by this connection unless
    ``mine`` is False); fail naming what is missing and what was found."""
    deadline = time.monotonic() + RECORD_TIMEOUT_S
    while True:
        listed = [c for c in await admin_changes(nc, since=since) if not mine or c.cid == nc.client_id]
        found = {key: next((c for c in listed if c.what == what), None) for key, what in wanted.items()}
        if all(found.values()):
            return {key: c for key, c in found.items() if c is not None}
        if time.monotonic() > deadline:
            missing = [wanted[k] for k, c in found.items() if c is None]
            raise AssertionError(f"not recorded within {RECORD_TIMEOUT_S}s: {missing}; "
                                 f"listed: {[(c.what, c.principal) for c in listed]}")
        await asyncio.sleep(0.05)


async def stored_after(nc: NATS, seq: int) -> list[dict[str, Any]]:
    """Every message in IL_ADMIN_AUDIT after stream sequence ``seq``: its JSON, with its ``seq`` and
    the subject it was ``stored_on``."""
    js = nc.jetstream()
    last = (await js.stream_info(s.ADMIN_AUDIT_STREAM)).state.last_seq
    out = []
    for n in range(seq + 1, last + 1):
        msg = await js.get_msg(s.ADMIN_AUDIT_STREAM, n)
        out.append({**json.loads(msg.data or b"{}"), "seq": n, "stored_on": msg.subject})
    return out


def about(stored: dict[str, Any], stream: str) -> bool:
    """Whether a stored record or advisory concerns ``stream``."""
    return stored.get("stream") == stream or stored.get("subject", "").endswith(f".{stream}")


async def barrier(nc: NATS, after_seq: int) -> str:
    """Create and delete a marker stream and wait until both its auditor records and both server
    advisories are stored after ``after_seq``: whatever the auditor was going to record of the
    requests before it is recorded by then. Returns the marker's name."""
    js = nc.jetstream()
    marker = scratch_name("BARRIER")
    await js.add_stream(StreamConfig(name=marker, subjects=[f"{marker}.>"]))
    await js.delete_stream(marker)
    deadline = time.monotonic() + RECORD_TIMEOUT_S
    while True:
        mine = [m for m in await stored_after(nc, after_seq) if about(m, marker)]
        if len(mine) >= 4:
            return marker
        if time.monotonic() > deadline:
            raise AssertionError(f"the barrier's change was not recorded within {RECORD_TIMEOUT_S}s: {mine}")
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


def cli_args(nc: NATS, *args: str) -> list[str]:
    url = nc.connected_url
    assert url is not None
    out = ["--nats", f"nats://{url.hostname}:{url.port}", "audit", "admin-changes", *args]
    creds = connection_creds(nc)
    return [*out, "--creds", str(creds)] if creds is not None else out


async def cli_rows(nc: NATS, *args: str) -> list[dict[str, Any]]:
    result = await asyncio.to_thread(CliRunner().invoke, app, [*cli_args(nc, *args), "-o", "json"])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


async def test_the_stream_keeps_changes_not_every_api_request(nc: NATS) -> None:
    audit = (await nc.jetstream().stream_info(s.ADMIN_AUDIT_STREAM)).config
    assert sorted(audit.subjects or []) == sorted([s.ADMIN_AUDIT, *s.JS_STREAM_ACTION_SUBJECTS])
    assert s.JS_API_AUDIT not in (audit.subjects or [])
    assert audit.deny_delete and audit.deny_purge
    assert (audit.max_age or 0) >= 365 * 24 * 3600


async def test_stream_changes_are_recorded_with_who_what_and_outcome(provisioned: str, nc: NATS) -> None:
    js = nc.jetstream()
    since = datetime.now(UTC) - timedelta(seconds=2)  # the server's clock is this machine's
    events = (await js.stream_info(s.EVENTS_STREAM)).config
    new_age = 3650 * 24 * 3600.0 if not events.max_age else events.max_age + 3600
    scratch = scratch_name("SCRATCH")
    async with auditors(provisioned):
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
        # the server's own advisories of the same changes are matched to these records, not listed apart
        # (the session's provisioning, just before, may be: no auditor ran then)
        listed = await admin_changes(nc, since=since)
        assert not [c for c in listed if c.principal == UNKNOWN_PRINCIPAL
                    and (c.stream == scratch or c.what == f"STREAM.UPDATE {s.EVENTS_STREAM}")]

    principal, user = expected_principal(nc)
    for change in found.values():
        assert (change.principal, change.user) == (principal, user)
        assert change.at >= since
    update = found["update"]
    assert update.ok and update.request["name"] == s.EVENTS_STREAM
    assert update.request["max_age"] == int(new_age * NS)  # the request as sent, in nanoseconds
    assert update.config is not None and update.config["max_age"] == int(new_age * NS)  # as the server stored it
    assert not found["purge"].ok and found["purge"].error
    # the restoring update changed exactly one setting, against the update before it
    updates = [c for c in await admin_changes(nc, since=since, stream=s.EVENTS_STREAM)
               if c.action == "UPDATE" and c.cid == nc.client_id]
    assert len(updates) == 2 and updates[0].seq == update.seq
    assert updates[1].changed == {"max_age": (int(new_age * NS), int((events.max_age or 0) * NS))}
    assert found["delete"].ok and found["delete"].request is None  # a delete has no body
    assert found["create"].ok and found["create"].request["subjects"] == [f"{scratch}.>"]

    only_events = await admin_changes(nc, since=since, stream=s.EVENTS_STREAM)
    assert {c.stream for c in only_events} == {s.EVENTS_STREAM}
    assert not [c for c in await admin_changes(nc, since=since, failed=False) if not c.ok]

    # the CLI lists them: when, who, what, the request
    rows = {(row["what"], row["seq"]): row for row in await cli_rows(nc, "--since", since.isoformat())}
    for change in found.values():
        row = rows[(change.what, change.seq)]
        assert row["who"] == principal and row["subject"] == change.subject
        assert datetime.fromisoformat(row["when"]) == change.at
        assert row["request"] == change.request
    assert rows[(found["purge"].what, found["purge"].seq)]["outcome"].startswith("refused")

    table = await asyncio.to_thread(CliRunner().invoke, app, cli_args(nc, "--since", since.isoformat()),
                                    env={"COLUMNS": "400"})
    assert table.exit_code == 0, table.output
    assert f"STREAM.DELETE {scratch}" in table.stdout and f"STREAM.UPDATE {s.EVENTS_STREAM}" in table.stdout
    assert "max_age:" in table.stdout or "max_age=" in table.stdout  # the update's setting (changed or request)

    consumers = await asyncio.to_thread(CliRunner().invoke, app, cli_args(nc, "--consumers"))
    assert consumers.exit_code != 0 and "consumer changes are not recorded" in consumers.output


async def test_reads_and_consumer_changes_add_nothing_to_the_record(provisioned: str, nc: NATS) -> None:
    js = nc.jetstream()
    async with auditors(provisioned):
        first = await barrier(nc, (await js.stream_info(s.ADMIN_AUDIT_STREAM)).state.last_seq)
        before = (await js.stream_info(s.ADMIN_AUDIT_STREAM)).state.last_seq
        # what the reconcilers and watchers do all day: stream infos (with every run's subject),
        # account info, a consumer created, read and deleted
        await js.stream_info(s.EVENTS_STREAM, subjects_filter=s.EVENTS_ALL)
        await js.account_info()
        durable = f"adminaudit_{uuid.uuid4().hex[:8]}"
        await js.add_consumer(s.EVENTS_STREAM, ConsumerConfig(durable_name=durable, filter_subject=s.EVENTS_ALL))
        await js.consumer_info(s.EVENTS_STREAM, durable)
        await js.delete_consumer(s.EVENTS_STREAM, durable)
        watch = await js.subscribe(s.EVENTS_ALL, ordered_consumer=True)  # what `interlock watch` does
        await watch.unsubscribe()
        second = await barrier(nc, before)
    added = await stored_after(nc, before)
    assert added and all(about(m, second) for m in added), (
        f"besides the barrier's change ({second}), stored: {[m for m in added if not about(m, second)]}")
    assert first != second


async def test_without_an_auditor_the_servers_advisory_still_records_the_change(nc: NATS) -> None:
    js = nc.jetstream()
    since = datetime.now(UTC) - timedelta(seconds=2)
    scratch = scratch_name("UNWATCHED")
    await js.add_stream(StreamConfig(name=scratch, subjects=[f"{scratch}.>"]))
    info = (await js.stream_info(scratch)).config
    await js.update_stream(replace(info, max_age=3600.0))
    await js.delete_stream(scratch)
    found = await recorded(nc, since, {
        "create": f"STREAM.CREATE {scratch}",
        "update": f"STREAM.UPDATE {scratch}",
        "delete": f"STREAM.DELETE {scratch}",
    }, mine=False)
    for change in found.values():
        assert change.principal == UNKNOWN_PRINCIPAL and change.ok and change.request is None
        assert change.subject.startswith(s.JS_STREAM_ACTION_PREFIX) and change.at >= since
    assert found["update"].changed is None  # what it changed is not known
    rows = await cli_rows(nc, "--since", since.isoformat(), "--stream", scratch)
    assert [(row["what"], row["who"]) for row in rows] == [
        (f"STREAM.{action} {scratch}", UNKNOWN_PRINCIPAL) for action in ("CREATE", "UPDATE", "DELETE")]


async def test_a_server_restart_is_no_change(tmp_path: Path) -> None:
    """A server announces each stream it restores at start-up as created: not listed as a create."""
    store = tmp_path / "store"
    server = EmbeddedNats(store_dir=store, port=0, log_file=tmp_path / "nats.log")
    server.start()
    try:
        client = await nats.connect(server.url)
        await provision(client.jetstream())
        await recorded(client, datetime.now(UTC) - timedelta(minutes=1),
                       {"events": f"STREAM.CREATE {s.EVENTS_STREAM}"}, mine=False)
        before = (await client.jetstream().stream_info(s.ADMIN_AUDIT_STREAM)).state.last_seq
        await client.close()
    finally:
        server.stop()
    server = EmbeddedNats(store_dir=store, port=0, log_file=tmp_path / "nats.log")
    server.start()
    try:
        client = await nats.connect(server.url)
        restarted = datetime.now(UTC) - timedelta(seconds=1)
        # the restart's advisories are in the stream (barrier: a change after them is listed) …
        marker = scratch_name("AFTER_RESTART")
        await client.jetstream().add_stream(StreamConfig(name=marker, subjects=[f"{marker}.>"]))
        await recorded(client, restarted, {"marker": f"STREAM.CREATE {marker}"}, mine=False)
        announced = {m["stream"] for m in await stored_after(client, before)
                     if m.get("action") == "create" and m.get("stream") != marker}
        # (streams restored before IL_ADMIN_AUDIT itself are announced before it can keep them)
        assert announced, "the server announced no stream at start-up: nothing to tell apart"
        # … and not listed as changes: one create each, the first
        creates = [c.stream for c in await admin_changes(client) if c.action == "CREATE"]
        assert all(creates.count(stream) == 1 for stream in announced), (announced, creates)
        await client.close()
    finally:
        server.stop()


async def test_two_auditor_copies_store_a_change_once(provisioned: str, nc: NATS) -> None:
    js = nc.jetstream()
    scratch = scratch_name("TWICE")
    async with auditors(provisioned, copies=2) as copies:
        before = (await js.stream_info(s.ADMIN_AUDIT_STREAM)).state.last_seq
        since = datetime.now(UTC) - timedelta(seconds=2)
        await js.add_stream(StreamConfig(name=scratch, subjects=[f"{scratch}.>"]))
        await js.delete_stream(scratch)
        create = (await recorded(nc, since, {"create": f"STREAM.CREATE {scratch}"}))["create"]
        # both copies handed the very advisory again (a redelivery, or a copy outside the queue
        # group): the message id (its sha256) keeps it from being stored twice
        advisory = (await js.get_msg(s.ADMIN_AUDIT_STREAM, create.seq)).data or b""
        record = record_for(advisory)
        assert record is not None and record.msg_id == hashlib.sha256(advisory).hexdigest()
        for copy in copies:
            await copy.record_change(record, advisory)
        await barrier(nc, before)
    stored = [m for m in await stored_after(nc, before) if m["stored_on"] == s.ADMIN_AUDIT and about(m, scratch)]
    assert sorted(m["subject"] for m in stored) == sorted([p.js_stream("CREATE", scratch),
                                                           p.js_stream("DELETE", scratch)]), stored  # once each


async def test_the_auditor_credential_may_hear_the_advisories_and_record_a_change(tmp_path: Path) -> None:
    """In operator mode, with the permissions derived from the catalog: the auditor's credential
    receives the API audit advisory of the admin's update and stores its record; the admin lists it
    under its principal. A worker's credential may do neither."""
    home = IdentityHome(tmp_path / "home")
    server = EmbeddedNats(store_dir=tmp_path / "store", port=0, log_file=tmp_path / "nats.log",
                          config=home.server_config())
    server.start()
    connections: list[NATS] = []

    async def connect_as(creds: Path) -> NATS:
        nc = await nats.connect(server.url, user_credentials=str(creds), inbox_prefix=creds_inbox_prefix(creds),
                                allow_reconnect=False, connect_timeout=2, error_cb=quiet)
        connections.append(nc)
        return nc

    async def quiet(e: Exception) -> None:
        pass

    try:
        admin = await connect_as(home.issue("admin", "acme", name="root"))
        await provision(admin.jetstream())
        auditor_nc = await connect_as(home.issue(c.AUDITOR))
        heard = await auditor_nc.subscribe(s.JS_API_AUDIT, queue=c.AUDITOR)
        await auditor_nc.flush()
        worker_nc = await connect_as(home.issue("worker", "acme", ["t"], name="w1"))
        worker_heard = await worker_nc.subscribe(s.JS_API_AUDIT)
        await worker_nc.flush()

        scratch = scratch_name("OPERATOR_MODE")
        await admin.jetstream().add_stream(StreamConfig(name=scratch, subjects=[f"{scratch}.>"]))
        record = None
        deadline = time.monotonic() + RECORD_TIMEOUT_S
        while record is None:
            msg = await heard.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            record = record_for(msg.data)  # the admin's stream info calls come first: not records
        service = AuditorService(ServiceSettings(nats_url=server.url), db_path=":memory:", instance="opmode")
        service.js = auditor_nc.jetstream()
        await service.record_change(record, msg.data)
        found = await recorded(admin, datetime.now(UTC) - timedelta(minutes=1),
                               {"create": f"STREAM.CREATE {scratch}"})
        assert found["create"].principal == "root"
        with pytest.raises(nats.errors.TimeoutError):
            await worker_heard.next_msg(timeout=0.5)  # the server refused the worker's subscription
        with pytest.raises((TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await worker_nc.jetstream(timeout=1.0).publish(s.ADMIN_AUDIT, record.body)
    finally:
        for nc in connections:
            if not nc.is_closed:
                await nc.close()
        server.stop()


async def test_the_record_itself_cannot_be_purged_or_its_messages_deleted(nc: NATS) -> None:
    js = nc.jetstream()
    before = (await js.stream_info(s.ADMIN_AUDIT_STREAM)).state
    assert before.messages > 0  # at least the session's provisioning is in it
    with pytest.raises(APIError):
        await js.purge_stream(s.ADMIN_AUDIT_STREAM)
    with pytest.raises(APIError):
        await js.delete_msg(s.ADMIN_AUDIT_STREAM, before.first_seq)
    after = (await js.stream_info(s.ADMIN_AUDIT_STREAM)).state
    assert after.first_seq == before.first_seq and after.messages >= before.messages


# -- what the auditor records, without a server ------------------------------------------------
def advisory(subject: str, *, request: str = "", response: str = '{"type":"x"}') -> bytes:
    return json.dumps({"type": s.JS_API_AUDIT_TYPE, "id": uuid.uuid4().hex, "timestamp": "2026-12-01T23:00:00Z",
                       "server": "n1", "client": {"acc": "A", "user": "U1", "name_tag": "admin", "id": 7},
                       "subject": subject, "request": request, "response": response}).encode()


@pytest.mark.parametrize(("subject", "kept"), [
    (p.js_stream("UPDATE", s.EVENTS_STREAM), True),
    (p.js_stream("CREATE", "X"), True),
    (p.js_stream("DELETE", "X"), True),
    (p.js_stream("PURGE", s.EVENTS_STREAM), True),
    (p.js_stream("MSG.DELETE", s.EVENTS_STREAM), True),
    (p.js_stream_info(s.EVENTS_STREAM), False),
    (p.js_consumer_info(s.JOBS_STREAM, "w"), False),
    (p.js_filtered_consumer_create(s.JOBS_STREAM, s.job("acme", "a.b"), "w"), False),  # consumers: not recorded
    (s.JS_API_INFO, False),
])
def test_only_stream_and_account_changes_are_recorded(subject: str, kept: bool) -> None:
    raw = advisory(subject)
    record = record_for(raw)
    assert (record is not None) is kept
    if record is not None:
        assert record.body == raw and record.msg_id == hashlib.sha256(raw).hexdigest() and not record.truncated


def test_an_advisory_too_large_is_stored_shortened_with_its_size_and_digest() -> None:
    config = json.dumps({"name": "BIG", "subjects": [f"big.{i}" for i in range(20_000)]})
    raw = advisory(p.js_stream("UPDATE", "BIG"), request=config, response=json.dumps({"config": config}))
    assert len(raw) > adminaudit.RECORD_LIMIT
    record = record_for(raw)
    assert record is not None and record.truncated
    assert len(record.body) <= adminaudit.RECORD_LIMIT
    assert record.msg_id == hashlib.sha256(raw).hexdigest()  # the id is the advisory's, not the shortened body's
    stored = AdminAuditRecord.model_validate_json(record.body)
    assert stored.truncated is not None
    assert (stored.truncated.size, stored.truncated.sha256) == (len(raw), record.msg_id)
    assert stored.client is not None and stored.client.name_tag == "admin"  # who is kept
    assert stored.subject == p.js_stream("UPDATE", "BIG")
    change = adminaudit.change_from_advisory(1, stored)
    assert change is not None and change.truncated == stored.truncated and change.what == "STREAM.UPDATE BIG"


async def test_a_shortened_record_fits_the_stream_and_is_listed_as_such(provisioned: str, nc: NATS) -> None:
    stream = scratch_name("BIG")
    config = json.dumps({"name": stream, "subjects": [f"big.{i}" for i in range(20_000)]})
    raw = advisory(p.js_stream("UPDATE", stream), request=config, response=json.dumps({"config": config}))
    record = record_for(raw)
    assert record is not None and record.truncated
    service = AuditorService(ServiceSettings(nats_url="nats://unused:4222"), db_path=":memory:", instance="big")
    auditor_nc = await connect(provisioned, creds=AUDITOR_CREDS[0], patient=False)  # only the auditor may record
    try:
        service.js = auditor_nc.jetstream()
        dead_before = (await nc.jetstream().stream_info(s.DLQ_STREAM)).state.messages
        await service.record_change(record, raw)  # a larger body would be refused by the stream (and dead-lettered)
    finally:
        await auditor_nc.close()
    assert (await nc.jetstream().stream_info(s.DLQ_STREAM)).state.messages == dead_before
    change = next(c for c in await admin_changes(nc, stream=stream))
    assert change.truncated is not None and change.truncated.size == len(raw)
    assert change.principal == "admin" and change.what == f"STREAM.UPDATE {stream}"
    table = await asyncio.to_thread(CliRunner().invoke, app, cli_args(nc, "--stream", stream), env={"COLUMNS": "400"})
    assert table.exit_code == 0 and f"shortened: {len(raw)} bytes" in table.stdout, table.output


def test_bytes_that_are_no_advisory_are_refused() -> None:
    with pytest.raises(ValueError, match="not a JetStream API audit advisory"):
        record_for(b"not json")


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
