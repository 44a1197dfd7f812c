"""Identity on a real nats-server in operator mode (port 0, temporary store and identity home).

Each refusal is paired with the allowed action for the right principal, so a test cannot pass
because nothing works at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from interlock.contracts import catalog as c
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.core.natsserver import EmbeddedNats
from interlock.core.topology import provision
from interlock.identity import IdentityHome, creds_inbox_prefix, describe_permission_error, permission_violation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SCRATCH_STREAM = "IDENTITY_SCRATCH"


@dataclass
class Stack:
    home: IdentityHome
    server: EmbeddedNats

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class Session:
    """A connection as one principal, with what the server reported to it."""

    nc: NATS
    name: str
    errors: list[Exception] = field(default_factory=list)
    error_seen: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("identity")
    home = IdentityHome(root / "home")
    server = EmbeddedNats(store_dir=root / "store", port=0, log_file=root / "nats.log", config=home.server_config())
    server.start()
    yield Stack(home, server)
    server.stop()


async def connect_as(stack: Stack, creds: Path, name: str) -> Session:
    session: Session

    async def on_error(e: Exception) -> None:
        session.errors.append(e)
        session.error_seen.set()

    async def on_closed() -> None:
        session.closed.set()

    nc = await nats.connect(stack.url, user_credentials=str(creds), inbox_prefix=creds_inbox_prefix(creds),
                            allow_reconnect=False, error_cb=on_error, closed_cb=on_closed, connect_timeout=2)
    session = Session(nc, name)
    return session


@pytest.fixture(scope="module")
async def admin(stack: Stack) -> AsyncIterator[Session]:
    creds = stack.home.issue("admin", "acme", name="root")
    session = await connect_as(stack, creds, "root")
    await provision(session.nc.jetstream())
    yield session
    await session.nc.close()


async def refused_connect(url: str, **options: Any) -> Exception:
    """The error of a connect the server refuses (fails the test if it is accepted)."""
    nc = NATS()

    async def quiet(e: Exception) -> None:
        pass

    try:
        await nc.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, error_cb=quiet,
                         **options)
    except Exception as e:
        # nats-py leaves a refused connection's socket open (a ResourceWarning, an error here)
        transport = nc._transport
        if transport is not None:
            transport.close()
            with contextlib.suppress(Exception):
                await transport.wait_closed()
        return e
    await nc.close()
    raise AssertionError(f"the server accepted a connection it should refuse ({options or 'anonymous'})")


async def wait_for_violation(session: Session, timeout: float = 5.0) -> Exception:
    await asyncio.wait_for(session.error_seen.wait(), timeout)
    session.error_seen.clear()
    return session.errors[-1]


async def test_anonymous_connect_is_refused_and_an_issued_user_connects(stack: Stack, admin: Session) -> None:
    refused = await refused_connect(stack.url)
    assert "Authorization Violation" in str(refused)
    message = describe_permission_error(refused, principal="anonymous", action="connect")
    assert message is not None and "refused the connection's credentials" in message

    creds = stack.home.issue("viewer", "acme", name="vera")
    session = await connect_as(stack, creds, "vera")
    try:
        assert session.nc.is_connected
        info = await session.nc.jetstream().stream_info(s.EVENTS_STREAM)  # a viewer may read stream info
        assert info.config.name == s.EVENTS_STREAM
    finally:
        await session.nc.close()


async def test_new_worker_works_at_once_and_is_held_to_its_tenant(stack: Stack, admin: Session) -> None:
    pid = stack.server.pid
    creds = stack.home.issue("worker", "acme", ["llm.summarize"], name="worker-acme")  # after the server started
    worker = await connect_as(stack, creds, "worker-acme")
    js = worker.nc.jetstream(timeout=1.0)
    try:
        # allowed: a heartbeat for its own tenant is stored
        ack = await js.publish(s.heartbeat("acme", "run-1"), b"{}")
        assert ack.stream == s.RESULTS_STREAM
        assert stack.server.pid == pid, "the server was not restarted"

        # refused, core publish: reported through error_cb only
        await worker.nc.publish(s.commit_subject("acme", "run-1", "planner", "flow"), b"{}")
        await worker.nc.flush()
        violation = await wait_for_violation(worker)
        forged = s.commit_subject("acme", "run-1", "planner", "flow")
        assert permission_violation(violation) == ("publish", forged.lower())
        message = describe_permission_error(violation, principal="worker-acme", action="append to a run log",
                                            subject=s.commit_subject("acme", "run-1", "planner", "flow"))
        assert message == (f"worker-acme may not append to a run log: the credential lacks permission to publish "
                           f"to {s.commit_subject('acme', 'run-1', 'planner', 'flow')!r}")

        # refused, JetStream publish: the server drops it, the client only times out
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)) as timed_out:
            await js.publish(s.heartbeat("globex", "run-2"), b"{}")
        message = describe_permission_error(timed_out.value, principal="worker-acme", action="send a heartbeat",
                                            subject=s.heartbeat("globex", "run-2"))
        assert message is not None and f"missing permission to publish to {s.heartbeat('globex', 'run-2')!r}" in message

        # nothing of the refused actions reached a stream
        admin_js = admin.nc.jetstream()
        for stream, subject in ((s.EVENTS_STREAM, s.run_log("acme", "run-1")),
                                (s.RESULTS_STREAM, s.heartbeat("globex", "run-2"))):
            with pytest.raises(NotFoundError):
                await admin_js.get_last_msg(stream, subject)
        assert (await admin_js.get_last_msg(s.RESULTS_STREAM, s.heartbeat("acme", "run-1"))).data == b"{}"
    finally:
        await worker.nc.close()


async def test_worker_pulls_only_its_tenants_jobs(stack: Stack, admin: Session) -> None:
    from nats.js.api import ConsumerConfig

    creds = stack.home.issue("worker", "acme", ["llm.summarize"], name="puller-acme")
    worker = await connect_as(stack, creds, "puller-acme")
    dispatcher = await connect_as(stack, stack.home.issue(c.DISPATCHER, name="jobs-dispatcher"),
                                  "jobs-dispatcher")
    js = worker.nc.jetstream(timeout=1.0)
    own = s.worker_consumer("acme", "llm.summarize")
    try:
        # allowed: the dispatcher publishes jobs (admin may not: it is not a service)
        await dispatcher.nc.jetstream(timeout=2.0).publish(s.job("acme", "llm.summarize"), b"job-a")
        # allowed: its own consumer, held by the server to its tenant's job subject
        await js.add_consumer(s.JOBS_STREAM, ConsumerConfig(name=own, durable_name=own,
                                                            filter_subject=s.job("acme", "llm.summarize")))
        sub = await js.pull_subscribe_bind(own, s.JOBS_STREAM)
        [msg] = await sub.fetch(1, timeout=2)
        assert msg.data == b"job-a"
        await msg.ack()

        # refused: the same consumer name with another tenant's filter, and another tenant's consumer
        other = s.worker_consumer("globex", "llm.summarize")
        for name, filter_subject in ((own, s.job("globex", "llm.summarize")),
                                     (other, s.job("globex", "llm.summarize"))):
            with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
                await js.add_consumer(s.JOBS_STREAM, ConsumerConfig(name=name, durable_name=name,
                                                                    filter_subject=filter_subject))
            violation = await wait_for_violation(worker)
            assert permission_violation(violation) is not None
    finally:
        await worker.nc.close()
        await dispatcher.nc.close()


async def test_viewer_reads_its_tenants_run_log_through_its_own_consumer_only(stack: Stack, admin: Session) -> None:
    from nats.js.api import ConsumerConfig

    planner = await connect_as(stack, stack.home.issue(c.PLANNER, name="log-planner"), "log-planner")
    viewer = await connect_as(stack, stack.home.issue("viewer", "acme", name="log-viewer"), "log-viewer")
    js = viewer.nc.jetstream(timeout=1.0)
    mine = p.principal_consumer(stack.home.principal("log-viewer").public_key, 0)
    try:
        # allowed: a service appends; the viewer reads its tenant's run through a consumer of its own
        await planner.nc.jetstream(timeout=2.0).publish(s.commit_subject("acme", "run-log", "planner", "flow"),
                                                              b"commit-1")
        await js.add_consumer(s.EVENTS_STREAM, ConsumerConfig(name=mine, filter_subject=s.run_log("acme", "run-log"),
                                                              inactive_threshold=30))
        sub = await js.pull_subscribe_bind(mine, s.EVENTS_STREAM)
        [msg] = await sub.fetch(1, timeout=2)
        assert msg.data == b"commit-1"
        await msg.ack()

        # refused: another tenant's run, and a consumer name that is not its own
        for name, filter_subject in ((mine, s.run_log("globex", "run-log")),
                                     ("snoop", s.run_log("acme", "run-log"))):
            with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
                await js.add_consumer(s.EVENTS_STREAM, ConsumerConfig(name=name, filter_subject=filter_subject))
            assert permission_violation(await wait_for_violation(viewer)) is not None
        assert (await admin.nc.jetstream().consumer_info(s.EVENTS_STREAM, mine)).config.filter_subject == \
            s.run_log("acme", "run-log")
    finally:
        await viewer.nc.close()
        await planner.nc.close()


async def test_revoking_a_connected_user_cuts_it_off_without_restart(stack: Stack, admin: Session) -> None:
    pid = stack.server.pid
    doomed = await connect_as(stack, stack.home.issue("worker", "acme", ["ops"], name="doomed"), "doomed")
    keeper = await connect_as(stack, stack.home.issue("worker", "acme", ["ops"], name="keeper"), "keeper")
    try:
        stack.home.revoke("doomed")
        replies = await stack.home.push(stack.url)
        assert replies and all(r["data"]["code"] == 200 for r in replies)

        await asyncio.wait_for(doomed.closed.wait(), 5.0)
        assert "revoked" in str(doomed.nc.last_error).lower()
        message = describe_permission_error(doomed.nc.last_error or Exception(), principal="doomed", action="pull jobs")
        assert message == "doomed may not pull jobs: the credential was revoked"

        refused = await refused_connect(stack.url, user_credentials=str(stack.home.principal("doomed").creds))
        assert "Authorization Violation" in str(refused)

        # the other worker is untouched, and the server never restarted
        await keeper.nc.jetstream(timeout=2.0).publish(s.heartbeat("acme", "run-3"), b"{}")
        assert keeper.nc.is_connected and stack.server.pid == pid
        assert [u.revoked_at is not None for u in stack.home.list() if u.name in ("doomed", "keeper")] == [True, False]
    finally:
        await keeper.nc.close()
        if not doomed.nc.is_closed:
            await doomed.nc.close()


@pytest.mark.parametrize("role_name", ["operator", c.DISPATCHER])
async def test_only_admin_may_update_or_delete_streams(stack: Stack, admin: Session, role_name: str) -> None:
    admin_js = admin.nc.jetstream()
    await admin_js.add_stream(StreamConfig(name=SCRATCH_STREAM, subjects=["identityscratch.>"]))
    creds = stack.home.issue(role_name, None if role_name == c.DISPATCHER else "acme", name=f"{role_name}-streams")
    other = await connect_as(stack, creds, f"{role_name}-streams")
    js = other.nc.jetstream(timeout=1.0)
    try:
        events_before = (await admin_js.stream_info(s.EVENTS_STREAM)).config
        for stream in (s.EVENTS_STREAM, SCRATCH_STREAM):
            with pytest.raises((TimeoutError, nats.errors.TimeoutError)) as refused:
                await js.delete_stream(stream)
            violation = await wait_for_violation(other)
            assert permission_violation(violation) == ("publish", p.js_stream("DELETE", stream).lower())
            assert describe_permission_error(refused.value, principal=other.name, action="delete a stream",
                                             subject=p.js_stream("DELETE", stream)) is not None
            with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
                await js.update_stream(StreamConfig(name=stream, subjects=["identityscratch.>"], max_msgs=1))
            violation = await wait_for_violation(other)
            assert permission_violation(violation) == ("publish", p.js_stream("UPDATE", stream).lower())
        assert (await admin_js.stream_info(s.EVENTS_STREAM)).config.max_msgs == events_before.max_msgs

        # admin's own changes work
        updated = await admin_js.update_stream(StreamConfig(name=SCRATCH_STREAM, subjects=["identityscratch.>"],
                                                            max_msgs=10))
        assert updated.config.max_msgs == 10
        assert await admin_js.delete_stream(SCRATCH_STREAM)
    finally:
        await other.nc.close()
        with pytest.raises(NotFoundError):
            await admin_js.stream_info(SCRATCH_STREAM)


async def test_revocations_and_new_credentials_survive_a_server_restart(tmp_path: Path) -> None:
    home = IdentityHome(tmp_path / "home")
    server = EmbeddedNats(store_dir=tmp_path / "store", port=0, log_file=tmp_path / "nats.log",
                          config=home.server_config())
    server.start()
    try:
        revoked = home.issue("viewer", "acme", name="gone")
        kept = home.issue("viewer", "acme", name="stays")
        home.revoke("gone")
        await home.push(server.url)
        server.stop()
        # the restarted server still preloads the account JWT from before the revocation (the
        # config was made at first start): the resolver's directory keeps the newer one
        server.start()

        refused = await refused_connect(server.url, user_credentials=str(revoked))
        assert "Authorization Violation" in str(refused)
        nc = await nats.connect(server.url, user_credentials=str(kept), allow_reconnect=False,
                                inbox_prefix=home.principal("stays").inbox_prefix, connect_timeout=2)
        assert nc.is_connected
        await nc.close()
    finally:
        server.stop()
