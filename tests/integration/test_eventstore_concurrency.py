"""The event store under concurrency, retries and tampering, against a real nats-server.

Timing figures are printed, never asserted: run with ``pytest -s`` to see them.

The module has a nats-server of its own (``provisioned`` is overridden below, so the shared
``nc`` fixture connects to it): it writes thousands of events of runs whose workflows exist
nowhere, and a forged commit, which the service tests' durable consumers (they start at the
beginning of the events stream) would otherwise have to work through.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import BadRequestError

from interlock.contracts import events as ev
from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.contracts.messages import JobError
from interlock.core import codec
from interlock.core.eventstore import (
    WRONG_LAST_SEQUENCE,
    Conflict,
    EventStore,
    EventStoreError,
    RunHandle,
    StoredCommit,
)
from interlock.core.natsserver import EmbeddedNats
from interlock.core.run import Run
from interlock.core.topology import provision
from interlock.core.verify import render_report, verify_run
from interlock.identity import IdentityHome
from interlock.runtime.connect import connect
from tests.principals import Principals

pytestmark = pytest.mark.integration

JOB_HASH = "j" * 64


# -- helpers ---------------------------------------------------------------------------------
def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def started(tenant: str) -> ev.RunStarted:
    return ev.RunStarted(workflow_id="wf", workflow_version="1", definition_hash="d" * 64,
                         idempotency_key=uuid.uuid4().hex, tenant=tenant, input={"x": 1})


def store_on(client: NATS, service: str) -> EventStore:
    return EventStore(client, client.jetstream(), service=service)


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory, identity_home: IdentityHome) -> Iterator[EmbeddedNats]:
    root = tmp_path_factory.mktemp("nats-eventstore-concurrency")
    server = EmbeddedNats(store_dir=root, port=0, config=identity_home.server_config(root / "resolver"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def provisioned(own_server: EmbeddedNats, admin_creds: Path) -> str:
    """This module's server, provisioned (overrides the session-wide fixture of the same name)."""
    client = await connect(own_server.url, creds=admin_creds, patient=False)
    await provision(client.jetstream())
    await client.close()
    return own_server.url


@pytest.fixture
def nc(service_nc: NATS) -> NATS:
    """A service's connection: these tests append to run logs as the services do."""
    return service_nc


@pytest.fixture
async def nc2(provisioned: str, principals: Principals) -> AsyncIterator[NATS]:
    """A second, independent connection: another copy of a service."""
    client = await connect(provisioned, creds=principals.service("planner"), patient=False)
    yield client
    await client.close()


async def new_run(store: EventStore) -> tuple[str, str, RunHandle]:
    tenant, rid = new_tenant(), uuid.uuid4()
    handle = await store.start_run(rid, started(tenant))
    return tenant, str(rid), handle


def flat(commits: list[StoredCommit]) -> list[dict[str, Any]]:
    return [envelope for commit in commits for envelope in commit.envelopes]


def make_ready(step_id: str) -> Any:
    def decide(run: Run) -> None:
        run.mark_step_ready(ev.StepReady(step_id=step_id, topic="work.do", input={"s": step_id}, job_hash=JOB_HASH))
    return decide


def state(run: Run) -> dict[str, Any]:
    """Everything a run holds, comparable with ``==`` (every StepState field included)."""
    out = {k: v for k, v in vars(run).items() if k not in ("_pending_events", "steps", "compensation")}
    out["steps"] = {sid: dataclasses.asdict(step) for sid, step in run.steps.items()}
    out["compensation"] = dataclasses.asdict(run.compensation) if run.compensation else None
    return out


async def assert_intact(store: EventStore, tenant: str, run_id: str, events: int) -> list[dict[str, Any]]:
    report = await verify_run(store, tenant, run_id)
    assert report.ok, render_report(report)
    assert report.events == events
    envelopes = flat(await store.read_commits(tenant, run_id))
    assert [e["seq"] for e in envelopes] == list(range(1, events + 1))
    return envelopes


# -- (a) two writers, one run -------------------------------------------------------------------
async def test_two_stores_append_to_one_run_concurrently(nc: NATS, nc2: NATS) -> None:
    one, two = store_on(nc, "copy-1"), store_on(nc2, "copy-2")
    tenant, rid, _ = await new_run(one)

    def slow_ready(step_id: str) -> Any:
        async def decide(run: Run) -> None:
            await asyncio.sleep(0.0005)  # a decision that awaits something: the other copy moves on
            make_ready(step_id)(run)
        return decide

    await asyncio.gather(*(one.update(tenant, rid, slow_ready(f"one-{i}")) for i in range(50)),
                         *(two.update(tenant, rid, slow_ready(f"two-{i}")) for i in range(50)))
    envelopes = await assert_intact(one, tenant, rid, 101)
    assert envelopes[0]["type"] == "RunStarted"
    assert all(e["type"] == "StepReady" for e in envelopes[1:])
    assert sorted(e["step_id"] for e in envelopes[1:]) == sorted(
        [f"one-{i}" for i in range(50)] + [f"two-{i}" for i in range(50)])
    assert {e["service"] for e in envelopes[1:]} == {"copy-1", "copy-2"}
    conflicts = one.stats["conflicts"] + two.stats["conflicts"]
    print(f"\n[two writers] 100 updates, {conflicts} conflicts retried "
          f"(copy-1 {one.stats}, copy-2 {two.stats})")
    assert conflicts > 0  # they did collide, and every collision was retried to success
    # every update was appended once: alone, or grouped with updates that waited behind it
    assert one.stats["appends"] + one.stats["grouped"] == 51
    assert two.stats["appends"] + two.stats["grouped"] == 50
    for store in (one, two):
        assert (await store.load(tenant, rid, fresh=True)).version == 101


# -- (b) duplicate Msg-Id ---------------------------------------------------------------------------
async def test_duplicate_msg_id_is_stored_once(nc: NATS) -> None:
    store = store_on(nc, "dup")
    js = nc.jetstream()
    tenant, rid, handle = await new_run(store)
    subject = s.commit_subject(tenant, rid, "dup", "flow")  # where the store appends its StepReady
    run = handle.run
    run.mark_step_ready(ev.StepReady(step_id="a", job_hash=JOB_HASH))
    envelopes = [codec.envelope_from_event(e, tenant=tenant, service="dup", prev_hash=handle.last_hash)
                 for e in run.collect_events()]
    payload = codec.encode_commit(rid, tenant, envelopes)
    msg_id = f"{rid}@2:{envelopes[-1]['hash'][:16]}"
    headers = {h.MSG_ID: msg_id, h.EXPECTED_LAST_SUBJECT_SEQ: str(handle.stream_seq)}
    first = await js.publish(subject, payload, headers=headers)
    assert not first.duplicate
    # the same bytes, Msg-Id and expected sequence again (a retry after a lost ack)
    try:
        second = await js.publish(subject, payload, headers=headers)
    except BadRequestError as e:
        # nats-server checks the expected sequence before it deduplicates: the retry is refused
        assert e.err_code == WRONG_LAST_SEQUENCE
        behaviour = "10071 wrong last sequence"
    else:
        assert second.duplicate and second.seq == first.seq
        behaviour = "duplicate ack"
    # with no expectation, or the one that now holds, the Msg-Id deduplicates
    third = await js.publish(subject, payload, headers={h.MSG_ID: msg_id})
    assert third.duplicate and third.seq == first.seq
    fourth = await js.publish(subject, payload, headers={h.MSG_ID: msg_id,
                                                         h.EXPECTED_LAST_SUBJECT_SEQ: str(first.seq)})
    assert fourth.duplicate and fourth.seq == first.seq
    # the store's own retry of that publish resolves to the copy that landed
    assert await store.recorder.append(subject, payload, msg_id, handle.stream_seq) == first.seq
    print(f"\n[duplicate Msg-Id] identical retry -> {behaviour}; without or with a current expectation -> "
          "duplicate ack; one copy stored")
    commits = await store.read_commits(tenant, rid)
    assert [c.stream_seq for c in commits] == [handle.stream_seq, first.seq]
    await assert_intact(store, tenant, rid, 2)


# -- (c) stale retry --------------------------------------------------------------------------------
async def test_stale_retry_is_ours_or_a_conflict(nc: NATS, nc2: NATS) -> None:
    store, other = store_on(nc, "mine"), store_on(nc2, "other")
    js = nc.jetstream()
    tenant, rid, first = await new_run(store)
    subject = s.commit_subject(tenant, rid, "mine", "flow")
    log = s.run_log(tenant, rid)  # appends are conditional on the run's whole log
    mine, envelopes = await store.update(tenant, rid, make_ready("a"))
    msg_id = f"{rid}@{envelopes[0]['seq']}:{envelopes[-1]['hash'][:16]}"  # as EventStore names it
    payload = codec.encode_commit(rid, tenant, envelopes)

    # the retry of a publish that landed: its expected sequence is now stale
    with pytest.raises(BadRequestError) as info:
        await js.publish(subject, payload, headers={h.MSG_ID: msg_id, h.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: log,
                                                    h.EXPECTED_LAST_SUBJECT_SEQ: str(first.stream_seq)})
    assert info.value.err_code == WRONG_LAST_SEQUENCE
    assert await store.recorder._landed(log, msg_id) == mine.stream_seq  # it was ours
    assert await store.recorder.append(subject, payload, msg_id, first.stream_seq, condition_on=log) == mine.stream_seq

    # another writer appends after it: the same stale retry is now a real conflict
    await other.update(tenant, rid, make_ready("b"))
    assert await store.recorder._landed(log, msg_id) is None
    with pytest.raises(Conflict):
        await store.recorder.append(subject, payload, msg_id, first.stream_seq, condition_on=log)

    # update() on the stale cached copy: one conflict, reload, decide again, append
    before = store.stats["conflicts"]
    handle, appended = await store.update(tenant, rid, make_ready("c"))
    assert store.stats["conflicts"] == before + 1
    assert [e["seq"] for e in appended] == [4] and sorted(handle.run.steps) == ["a", "b", "c"]
    await assert_intact(store, tenant, rid, 4)


# -- (d) tampering ----------------------------------------------------------------------------------
async def test_forged_commit_is_detected(nc: NATS, nc2: NATS) -> None:
    store = store_on(nc, "writer")
    tenant, rid, _ = await new_run(store)
    for step in ("a", "b"):
        await store.update(tenant, rid, make_ready(step))
    forged: dict[str, Any] = {
        "run_id": rid, "tenant": tenant, "seq": 4, "type": "StepReady", "at": datetime.now(UTC).isoformat(),
        "service": "mallory", "step_id": "x", "attempt": None,
        "data": ev.StepReady(step_id="x", job_hash=JOB_HASH).model_dump(mode="json"),
        "prev_hash": "ab" * 32,  # not the hash of seq 3
    }
    forged["hash"] = codec.event_hash(forged)  # a self-consistent event, just not linked
    where = s.commit_subject(tenant, rid, "mallory", "flow")
    ack = await nc.jetstream().publish(where, codec.encode_commit(rid, tenant, [forged]))
    assert ack.seq > 0

    report = await verify_run(store, tenant, rid)
    assert not report.ok
    assert [(p.seq, p.kind, p.stream_seq) for p in report.problems] == [(4, "broken_link", ack.seq)]
    print(f"\n[tamper] {render_report(report)}")
    # a reader skips it: it changes no state (and never wedges the run)
    reader = await store_on(nc2, "reader").load(tenant, rid, fresh=True)
    assert reader.version == 3 and "x" not in reader.run.steps and reader.stream_seq == ack.seq
    # the writer's cached copy is behind: its next append conflicts, reloads past the forged
    # commit, and appends seq 4 after it
    handle, appended = await store.update(tenant, rid, make_ready("c"))
    assert [e["seq"] for e in appended] == [4] and "x" not in handle.run.steps
    assert store.stats["conflicts"] >= 1


# -- (e) replay equality ----------------------------------------------------------------------------
async def test_fresh_load_equals_the_writers_aggregate(nc: NATS, nc2: NATS) -> None:
    writer = store_on(nc, "writer")
    tenant, rid, handle = await new_run(writer)
    now = datetime.now(UTC)

    def prepare(step_id: str, gated: bool) -> Any:
        def decide(run: Run) -> None:
            run.mark_step_ready(ev.StepReady(step_id=step_id, topic="work.do", input={"s": step_id},
                                             job_hash=JOB_HASH))
            run.decide_policy(ev.PolicyDecided(step_id=step_id, job_hash=JOB_HASH, snapshot_id="snap",
                                               decision="require_approval" if gated else "allow",
                                               approver_role="lead" if gated else None))
            if gated:
                run.request_approval(ev.ApprovalRequested(step_id=step_id, job_hash=JOB_HASH, snapshot_id="snap",
                                                          approver_role="lead", expires_at=now + timedelta(hours=1)))
                run.grant_approval(ev.ApprovalGranted(step_id=step_id, job_hash=JOB_HASH, approver="ann",
                                                      role="lead"), now=now)
        return decide

    def call(method: str, data: Any) -> Any:
        return lambda run: getattr(run, method)(data)

    for i in range(50):
        sid = f"s{i:02}"
        handle, _ = await writer.update(tenant, rid, prepare(sid, gated=i % 5 == 0))
        handle, _ = await writer.update(tenant, rid, call("dispatch_step", ev.StepDispatched(
            step_id=sid, attempt=1, job_id=f"{rid}:{sid}@1", topic="work.do", deadline=now + timedelta(minutes=5))))
        handle, _ = await writer.update(tenant, rid, call("record_heartbeat", ev.StepHeartbeat(
            step_id=sid, attempt=1, worker="w1", progress="1/2")))
        attempt = 1
        if i % 4 == 0:  # a failure and a retry
            def retry(run: Run, sid: str = sid) -> None:
                run.fail_step(ev.StepFailed(step_id=sid, attempt=1, final=False, error=JobError(message="flaky")))
                run.schedule_retry(ev.RetryScheduled(step_id=sid, attempt=2, due_at=now, delay_ms=5))
                run.dispatch_step(ev.StepDispatched(step_id=sid, attempt=2, job_id=f"{rid}:{sid}@2", topic="work.do"))
            handle, _ = await writer.update(tenant, rid, retry)
            attempt = 2
        handle, _ = await writer.update(tenant, rid, call("succeed_step", ev.StepSucceeded(
            step_id=sid, attempt=attempt, output={"i": i, "text": "ü" * (i % 3)}, worker="w1")))
    handle, _ = await writer.update(tenant, rid, call("skip_step", ev.StepSkipped(step_id="z", reason="no")))
    handle, _ = await writer.update(tenant, rid, call("succeed", ev.RunSucceeded(output={"n": 50})))
    assert 290 <= handle.version <= 320

    fresh = await store_on(nc2, "reader").load(tenant, rid)
    assert fresh.version == handle.version
    assert fresh.last_hash == handle.last_hash and fresh.stream_seq == handle.stream_seq
    assert state(fresh.run) == state(handle.run)
    await assert_intact(writer, tenant, rid, handle.version)


# -- (f) load time and append rate --------------------------------------------------------------
async def test_load_a_thousand_events_and_append_rate(nc: NATS, nc2: NATS) -> None:
    writer = store_on(nc, "writer")
    tenant, rid, _ = await new_run(writer)
    began = time.perf_counter()
    for i in range(999):
        await writer.update(tenant, rid, make_ready(f"s{i:03}"))
    append_s = time.perf_counter() - began

    reader = store_on(nc2, "reader")
    began = time.perf_counter()
    handle = await reader.load(tenant, rid)
    load_s = time.perf_counter() - began
    began = time.perf_counter()
    report = await verify_run(reader, tenant, rid)
    verify_s = time.perf_counter() - began
    print(f"\n[perf] single-event appends: {999 / append_s:,.0f} events/s ({append_s * 1000 / 999:.2f} ms each); "
          f"fresh load of 1,000 events: {load_s * 1000:.1f} ms; verify_run: {verify_s * 1000:.1f} ms")
    assert handle.version == 1000 and len(handle.run.steps) == 999
    assert report.ok and report.events == 1000 and report.head_hash == handle.last_hash


# -- (g) 200-step fan-out ---------------------------------------------------------------------------
async def test_fan_out_of_200_concurrent_successes(nc: NATS, nc2: NATS) -> None:
    one, two = store_on(nc, "copy-1"), store_on(nc2, "copy-2")
    tenant, rid, _ = await new_run(one)
    steps = [f"s{i:03}" for i in range(200)]

    def fan_out(run: Run) -> None:
        for sid in steps:
            run.mark_step_ready(ev.StepReady(step_id=sid, topic="work.do", input={"s": sid}, job_hash=JOB_HASH))
            run.decide_policy(ev.PolicyDecided(step_id=sid, decision="allow", snapshot_id="snap", job_hash=JOB_HASH))
            run.dispatch_step(ev.StepDispatched(step_id=sid, attempt=1, job_id=f"{rid}:{sid}@1", topic="work.do"))

    await one.update(tenant, rid, fan_out)

    def succeed(sid: str) -> Any:
        def decide(run: Run) -> None:
            run.succeed_step(ev.StepSucceeded(step_id=sid, attempt=1, output={"step": sid}, worker="w"))
        return decide

    before = one.stats["conflicts"] + two.stats["conflicts"]
    began = time.perf_counter()
    await asyncio.gather(*(((one, two)[i % 2]).update(tenant, rid, succeed(sid)) for i, sid in enumerate(steps)))
    wall = time.perf_counter() - began
    conflicts = one.stats["conflicts"] + two.stats["conflicts"] - before
    print(f"\n[fan-out] 200 concurrent successes over 2 stores: {wall * 1000:.0f} ms wall, {conflicts} conflicts "
          f"(copy-1 loads {one.stats['loads']}, copy-2 loads {two.stats['loads']})")

    envelopes = await assert_intact(one, tenant, rid, 1 + 600 + 200)
    successes = Counter(e["step_id"] for e in envelopes if e["type"] == "StepSucceeded")
    assert successes == Counter(steps)  # every step exactly once
    handle = await store_on(nc, "reader").load(tenant, rid)
    assert all(step.status == "succeeded" for step in handle.run.steps.values())


# -- regressions ------------------------------------------------------------------------------------
async def test_failed_append_does_not_leave_unstored_events_in_the_cache(nc: NATS, nc2: NATS,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An append that fails (not a conflict) must not leave its events in the cached run: the next
    append would follow them and write a seq gap that no reader could ever replay."""
    store = store_on(nc, "writer")
    tenant, rid, _ = await new_run(store)
    real = store.recorder.append
    calls = 0

    async def flaky(*args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise EventStoreError("append not acknowledged for 30s")
        return await real(*args, **kwargs)

    monkeypatch.setattr(store.recorder, "append", flaky)
    with pytest.raises(EventStoreError):
        await store.update(tenant, rid, make_ready("lost"))
    handle, appended = await store.update(tenant, rid, make_ready("b"))
    assert [e["seq"] for e in appended] == [2] and sorted(handle.run.steps) == ["b"]
    await assert_intact(store, tenant, rid, 2)
    assert sorted((await store_on(nc2, "reader").load(tenant, rid)).run.steps) == ["b"]


@pytest.mark.parametrize("brought_forward_by", ["observe", "load"])
async def test_a_decide_that_awaits_keeps_the_state_it_started_from(nc: NATS, nc2: NATS, brought_forward_by: str
                                                                    ) -> None:
    """A commit that lands while a decide awaits (a consumer delivers it, or another task loads the
    run) must not change the run under the decide: its append then conflicts and it decides again.
    Before, the cached copy was brought forward in place, the append followed the new commit, and
    the decision rested on a state older than the one it was appended after (#16: the dispatcher's
    gate admitted the jobs due when the decide began, then one more job, released by an approval
    delivered meanwhile, was dispatched without a slot)."""
    mine, other = store_on(nc, "copy-1"), store_on(nc2, "copy-2")
    tenant, rid, _ = await new_run(mine)
    await mine.load(tenant, rid)  # cached, as a service's copy is
    waiting, go_on = asyncio.Event(), asyncio.Event()
    seen: list[tuple[list[str], list[str]]] = []  # the steps at the start and at the end of each decide

    async def decide(run: Run) -> None:
        before = sorted(run.steps)
        if not seen:
            waiting.set()
            await go_on.wait()  # a round trip (the gate bucket) while the log moves on
        seen.append((before, sorted(run.steps)))
        make_ready(f"decided-on-{len(before)}")(run)

    update = asyncio.create_task(mine.update(tenant, rid, decide))
    await waiting.wait()
    meanwhile, _ = await other.update(tenant, rid, make_ready("meanwhile"))
    if brought_forward_by == "observe":
        [commit] = await mine.read_commits(tenant, rid, after_seq=meanwhile.stream_seq - 1)
        mine.observe(tenant, rid, commit.stream_seq, commit)
    else:
        await mine.load(tenant, rid, fresh=True)
    go_on.set()
    handle, appended = await update
    assert seen[0][0] == seen[0][1] == [], "the run changed under the decide"
    assert seen[1] == (["meanwhile"], ["meanwhile"]) and len(seen) == 2, seen
    assert [e["step_id"] for e in appended] == ["decided-on-1"]
    assert sorted(handle.run.steps) == ["decided-on-1", "meanwhile"]
    await assert_intact(mine, tenant, rid, 3)
    assert (await mine.load(tenant, rid)).version == 3  # cached again, current


async def test_read_commits_pages_through_interleaved_subjects(nc: NATS, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs longer than one direct-get batch are read page by page, with other runs in between."""
    store = store_on(nc, "writer")
    tenant, rid, _ = await new_run(store)
    other_tenant, other_rid, _ = await new_run(store)
    for i in range(20):
        await store.update(tenant, rid, make_ready(f"s{i}"))
        await store.update(other_tenant, other_rid, make_ready(f"o{i}"))
    real = store.recorder._direct_get_batch

    async def small_batches(subject: str, start: int, size: int = 10_000) -> Any:
        return await real(subject, start, 7)

    monkeypatch.setattr(store.recorder, "_direct_get_batch", small_batches)
    envelopes = await assert_intact(store, tenant, rid, 21)
    assert [e["step_id"] for e in envelopes[1:]] == [f"s{i}" for i in range(20)]
    assert (await store.load(tenant, rid, fresh=True)).version == 21
