"""The auditor service against a real nats-server: live projection, NATS queries, rebuild by replay."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from interlock.auditor.projection import Projection, RebuildStats
from interlock.auditor.service import AuditorService, catch_up
from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import JobError, QueryReply, RunQuery, RunsQuery
from interlock.core import codec
from interlock.core.eventstore import EventStore
from interlock.core.run import Run
from interlock.runtime.connect import connect
from interlock.runtime.settings import ServiceSettings
from tests.principals import Principals, SignedByTheirWriter

pytestmark = pytest.mark.integration

WAIT_S = 10.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def jh(step_id: str) -> str:
    return codec.job_hash(workflow_id="wf", workflow_version="1", step_id=step_id, topic="work.do", input=None)


async def write_run(store: EventStore, tenant: str, *steps: Callable[[Run], None]) -> tuple[str, int, int]:
    """Start a run and append one commit per step; (run id, events, stream seq of the last commit)."""
    run_id = uuid.uuid4()
    handle = await store.start_run(run_id, ev.RunStarted(
        workflow_id="wf", workflow_version="1", definition_hash="d" * 64, idempotency_key=uuid.uuid4().hex,
        tenant=tenant, requested_by="it"))
    for step in steps:
        handle, _ = await store.update(tenant, str(run_id), step)
    return str(run_id), handle.version, handle.stream_seq


def ready(step_id: str, step_type: str = "job") -> Callable[[Run], None]:
    return lambda run: run.mark_step_ready(ev.StepReady(
        step_id=step_id, step_type=step_type,
        topic="work.do" if step_type == "job" else None, job_hash=jh(step_id)))


def allow(step_id: str) -> Callable[[Run], None]:
    return lambda run: run.decide_policy(ev.PolicyDecided(
        step_id=step_id, decision="allow", snapshot_id="builtin@1", rule_ids=["builtin.allow"], job_hash=jh(step_id)))


def dispatch(step_id: str, attempt: int) -> Callable[[Run], None]:
    return lambda run: run.dispatch_step(ev.StepDispatched(
        step_id=step_id, attempt=attempt, job_id=f"{run.run_id}:{step_id}@{attempt}", topic="work.do"))


def fail_and_retry(step_id: str) -> Callable[[Run], None]:
    def command(run: Run) -> None:
        run.fail_step(ev.StepFailed(step_id=step_id, attempt=1, final=False, error=JobError(message="boom")))
        run.schedule_retry(ev.RetryScheduled(step_id=step_id, attempt=2, due_at=datetime.now(UTC), delay_ms=200))
    return command


def succeed(step_id: str, attempt: int) -> Callable[[Run], None]:
    return lambda run: run.succeed_step(ev.StepSucceeded(step_id=step_id, attempt=attempt, output={"ok": step_id}))


def request(step_id: str) -> Callable[[Run], None]:
    return lambda run: run.request_approval(ev.ApprovalRequested(
        step_id=step_id, job_hash=jh(step_id), snapshot_id="builtin@1", approver_role="approver", prompt="go?"))


def finish(run: Run) -> None:
    run.succeed(ev.RunSucceeded())


async def write_runs(store: EventStore, tenant: str) -> dict[str, tuple[int, int]]:
    """Three runs: finished with a retry, waiting for approval, just started. run id -> (events, stream seq)."""
    done = await write_run(store, tenant, ready("a"), allow("a"), dispatch("a", 1), fail_and_retry("a"),
                           dispatch("a", 2), succeed("a", 2), finish)
    waiting = await write_run(store, tenant, ready("gate", "approval"), allow("gate"), request("gate"))
    fresh = await write_run(store, tenant)
    return {run_id: (events, seq) for run_id, events, seq in (done, waiting, fresh)}


async def wait_projected(projection: Projection, expected: dict[str, tuple[int, int]]) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        seqs = {run_id: await projection.last_seq(run_id) for run_id in expected}
        if all(seqs[run_id] >= events for run_id, (events, _) in expected.items()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not projected within {WAIT_S}s: {seqs} (expected {expected})")
        await asyncio.sleep(0.05)


async def ask(nc: NATS, subject: str, query: RunQuery | RunsQuery | bytes) -> QueryReply:
    data = query if isinstance(query, bytes) else query.model_dump_json().encode()
    reply = await nc.request(subject, data, timeout=5)
    return QueryReply.model_validate_json(reply.data)


async def answers(projection: Projection, tenant: str, run_ids: list[str]) -> dict[str, Any]:
    return {
        "runs": await projection.runs(tenant=tenant),
        "approvals": await projection.approvals(tenant=tenant),
        **{f"status {r}": await projection.status(r) for r in run_ids},
        **{f"timeline {r}": await projection.timeline(r) for r in run_ids},
    }


def remove_files(folder: Path, pattern: str) -> None:
    for path in folder.glob(pattern):
        path.unlink()


@pytest.fixture
def nc(service_nc: NATS) -> NATS:
    """These tests write run logs as a service would (only services may)."""
    return service_nc


@pytest.fixture
async def querier(provisioned: str, principals: Principals) -> AsyncIterator[NATS]:
    """A client of every tenant (the HTTP API's credential): the queries name many tenants."""
    client = await connect(provisioned, creds=principals.service("api"), patient=False)
    yield client
    await client.close()


AUDITOR_CREDS: list[Path] = []  # the session's auditor credential, set by the autouse fixture below


@pytest.fixture(autouse=True)
def auditor_creds(principals: Principals) -> None:
    AUDITOR_CREDS[:] = [principals.service("auditor")]


def auditor(url: str, db_path: str | Path = ":memory:", instance: str | None = None) -> AuditorService:
    return AuditorService(ServiceSettings(nats_url=url, creds=AUDITOR_CREDS[0]), db_path=db_path,
                          instance=instance or unique("it"))


async def test_live_projection_answers_queries_and_matches_a_rebuild(provisioned: str, nc: NATS, principals: Principals,
                                                                     querier: NATS) -> None:
    tenant = unique("t-aud")
    store = EventStore(nc, nc.jetstream(), service="test", authenticity=SignedByTheirWriter(principals))
    service = auditor(provisioned)
    await service.start()
    try:
        expected = await write_runs(store, tenant)
        done, waiting, fresh = list(expected)
        await wait_projected(service.projection, expected)

        reply = await ask(querier, s.query(tenant, "status"), RunQuery(run_id=done, tenant=tenant))
        assert reply.ok, reply.error
        status = reply.result
        assert status["status"] == "succeeded" and status["chain_ok"] is True and status["tenant"] == tenant
        assert status["last_seq"] == expected[done][0]
        (step,) = status["steps"]
        assert step["step_id"] == "a" and step["status"] == "succeeded" and step["attempts"] == 2
        assert step["decision"] == {"decision": "allow", "snapshot_id": "builtin@1", "rule_ids": ["builtin.allow"]}
        assert step["output"] == {"ok": "a"}

        reply = await ask(querier, s.query(tenant, "timeline"), RunQuery(run_id=done))
        assert reply.ok
        summaries = [entry["summary"] for entry in reply.result]
        assert "policy allow (rules builtin.allow, snapshot builtin@1)" in summaries
        assert "failed attempt 1: boom (retry)" in summaries
        assert "retry 2 scheduled in 200 ms" in summaries
        assert f"dispatched attempt 2 (job {done}:a@2)" in summaries
        assert [entry["seq"] for entry in reply.result] == list(range(1, expected[done][0] + 1))
        assert all(entry["service"] == "test" for entry in reply.result)

        reply = await ask(querier, s.query(tenant, "runs"), RunsQuery())
        assert reply.ok and [r["run_id"] for r in reply.result] == [fresh, waiting, done]
        reply = await ask(querier, s.query(tenant, "runs"), RunsQuery(status="succeeded"))
        assert [r["run_id"] for r in reply.result] == [done]

        reply = await ask(querier, s.query(tenant, "approvals"), RunsQuery())
        assert reply.ok and len(reply.result) == 1
        pending = reply.result[0]
        assert (pending["run_id"], pending["step_id"], pending["job_hash"], pending["approver_role"],
                pending["prompt"], pending["snapshot_id"]) == (waiting, "gate", jh("gate"), "approver", "go?",
                                                               "builtin@1")

        missing = str(uuid.uuid4())
        for name in ("status", "timeline"):
            reply = await ask(querier, s.query(tenant, name), RunQuery(run_id=missing))
            assert not reply.ok and reply.error == f"run {missing} not found"
            # another tenant's subject does not see this tenant's run
            reply = await ask(querier, s.query("another-tenant", name), RunQuery(run_id=done))
            assert not reply.ok and reply.error == f"run {done} not found"
        for bad in (b"not json", b'{"tenant": 5}'):
            reply = await ask(querier, s.query(tenant, "status"), bad)
            assert not reply.ok and (reply.error or "").startswith("invalid RunQuery")
        assert (await ask(querier, s.query(tenant, "runs"), b"")).ok  # an empty query is a query with defaults

        live = await answers(service.projection, tenant, list(expected))

        # rebuild into a fresh projection, once for the tenant, once for the whole stream
        for tenants in ([tenant], None):
            reports: list[RebuildStats] = []
            async with Projection(":memory:") as rebuilt:
                stats = await rebuilt.rebuild(store, tenants, progress=reports.append, every=5)
                assert await answers(rebuilt, tenant, list(expected)) == live
                assert stats.runs >= 3 and stats.events >= sum(e for e, _ in expected.values())
                assert stats.bad_messages == 0 and stats.stream_seq >= max(seq for _, seq in expected.values())
                assert reports and reports[-1] is stats and len(reports) >= 2
                position = await rebuilt.position()
                assert position["rebuilt_at"] is not None and position["stream_seq"] == stats.stream_seq

        # the running service rebuilds its own projection in place; live consumption resumes after it
        stats = await service.rebuild(tenants=[tenant])
        assert stats.runs == 3
        assert await answers(service.projection, tenant, list(expected)) == live
        more = await write_runs(store, tenant)
        await wait_projected(service.projection, more)
    finally:
        await service.stop()


async def test_a_query_is_answered_for_the_subjects_tenant_only(provisioned: str, nc: NATS, principals: Principals,
                                                                querier: NATS) -> None:
    tenant_a, tenant_b = unique("t-a"), unique("t-b")
    store = EventStore(nc, nc.jetstream(), service="test", authenticity=SignedByTheirWriter(principals))
    service = auditor(provisioned)
    await service.start()
    try:
        runs_a = await write_runs(store, tenant_a)
        runs_b = await write_runs(store, tenant_b)
        await wait_projected(service.projection, {**runs_a, **runs_b})
        for tenant, own, other in ((tenant_a, runs_a, runs_b), (tenant_b, runs_b, runs_a)):
            reply = await ask(querier, s.query(tenant, "runs"), RunsQuery(limit=10_000))
            assert reply.ok and {r["run_id"] for r in reply.result} == set(own)  # none of the other's
            reply = await ask(querier, s.query(tenant, "approvals"), RunsQuery())
            assert reply.ok and {a["run_id"] for a in reply.result} < set(own) and len(reply.result) == 1
            for run_id in other:
                for name in ("status", "timeline"):
                    reply = await ask(querier, s.query(tenant, name), RunQuery(run_id=run_id))
                    assert not reply.ok and reply.error == f"run {run_id} not found"
                    # naming the other tenant in the body does not help: it is refused
                    other_tenant = tenant_b if tenant == tenant_a else tenant_a
                    reply = await ask(querier, s.query(tenant, name), RunQuery(run_id=run_id, tenant=other_tenant))
                    assert not reply.ok and reply.error == (
                        f"the request names tenant {other_tenant!r} but was sent as {tenant!r} (subject "
                        f"{s.query(tenant, name)}): the tenant is taken from the subject, never from the body")
            reply = await ask(querier, s.query(tenant, "runs"), RunsQuery(tenant=tenant))  # agreeing: fine
            assert reply.ok and {r["run_id"] for r in reply.result} == set(own)
    finally:
        await service.stop()


async def test_catch_up_reads_missing_commits_from_the_log(provisioned: str, nc: NATS, principals: Principals) -> None:
    tenant = unique("t-gap")
    store = EventStore(nc, nc.jetstream(), service="test", authenticity=SignedByTheirWriter(principals))
    run_id, events, last_stream_seq = await write_run(store, tenant, ready("a"), allow("a"), dispatch("a", 1))
    commits = await store.read_commits(tenant, run_id)
    async with Projection(":memory:") as projection:
        # only the last commit is delivered (the earlier ones were redelivered late)
        await catch_up(projection, store, tenant, run_id, commits[-1].envelopes, commits[-1].stream_seq)
        status = await projection.status(run_id)
        assert status is not None and status["chain_ok"] is True and status["last_seq"] == events
        # the late ones then arrive: nothing changes
        for commit in commits:
            await catch_up(projection, store, tenant, run_id, commit.envelopes, commit.stream_seq)
        assert await projection.status(run_id) == status
        assert (await projection.position())["stream_seq"] == last_stream_seq


async def test_each_copy_has_its_own_consumer_and_a_lost_projection_is_replayed(
        provisioned: str, nc: NATS, principals: Principals, tmp_path: Path) -> None:
    tenant = unique("t-copy")
    store = EventStore(nc, nc.jetstream(), service="test", authenticity=SignedByTheirWriter(principals))
    js = nc.jetstream()
    name = unique("copy")
    db = tmp_path / "auditor.sqlite3"
    one, two = auditor(provisioned, db, name), auditor(provisioned, tmp_path / "two.sqlite3")
    assert one.durable("events") == f"auditor_{name}" != two.durable("events")
    await one.start()
    await two.start()
    try:
        expected = await write_runs(store, tenant)
        await wait_projected(one.projection, expected)
        await wait_projected(two.projection, expected)  # both copies see every commit
        last = max(seq for _, seq in expected.values())
        deadline = time.monotonic() + WAIT_S
        while (await js.consumer_info(s.EVENTS_STREAM, one.durable("events"))).ack_floor.stream_seq < last:
            assert time.monotonic() < deadline, "acks did not reach the server"
            await asyncio.sleep(0.05)
    finally:
        await one.stop()
        await two.stop()

    # the copy's file is lost: the same copy (same durable) must replay, not resume after its acks
    remove_files(tmp_path, "auditor.sqlite3*")
    again = auditor(provisioned, db, name)
    await again.start()
    try:
        await wait_projected(again.projection, expected)
        status = await again.projection.status(next(iter(expected)))
        assert status is not None and status["chain_ok"] is True
    finally:
        await again.stop()
    with pytest.raises(ValueError):
        auditor(provisioned, instance="...")


async def test_rebuild_without_starting_the_service(provisioned: str, nc: NATS, principals: Principals,
                                                    tmp_path: Path) -> None:
    tenant = unique("t-cli")
    store = EventStore(nc, nc.jetstream(), service="test", authenticity=SignedByTheirWriter(principals))
    expected = await write_runs(store, tenant)
    service = auditor(provisioned, tmp_path / "cli.sqlite3")
    lines: list[str] = []
    stats = await service.rebuild(tenants=[tenant], progress=lambda st: lines.append(f"{st.events} events"))
    assert stats.runs == 3 and stats.broken_runs == 0 and lines
    async with Projection(tmp_path / "cli.sqlite3") as projection:
        runs = await projection.runs(tenant=tenant)
        assert {r["run_id"] for r in runs} == set(expected)
        assert all(r["chain_ok"] for r in runs)
