"""The auditor's SQLite projection, fed with envelopes from a real Run aggregate (real hash chain)."""

from __future__ import annotations

import asyncio
import copy
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from interlock.auditor.projection import Projection
from interlock.contracts import events as ev
from interlock.contracts.messages import JobError
from interlock.core import codec
from interlock.core.run import Run
from interlock.core.timeline import UNKNOWN_TYPE_SUMMARY

TENANT = "t-proj"


# -- building logs from the aggregate ------------------------------------------------------------
def jh(step_id: str) -> str:
    return codec.job_hash(workflow_id="wf", workflow_version="1", step_id=step_id, topic="work.do",
                          input={"step": step_id})


class Log:
    """A run and its log: each :meth:`commit` turns what the commands produced into envelopes."""

    def __init__(self, tenant: str = TENANT, workflow_id: str = "wf") -> None:
        self.tenant = tenant
        self.run = Run.start(uuid.uuid4(), ev.RunStarted(
            workflow_id=workflow_id, workflow_version="1", definition_hash="d" * 64,
            idempotency_key=uuid.uuid4().hex, tenant=tenant, requested_by="tester", input={"x": 1}))
        self.last_hash = ev.GENESIS_HASH
        self.commits: list[list[dict[str, Any]]] = []
        self.commit()

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def commit(self, *commands: Callable[[Run], None]) -> list[dict[str, Any]]:
        for command in commands:
            command(self.run)
        envelopes = []
        for event in self.run.collect_events():
            envelope = codec.envelope_from_event(event, tenant=self.tenant, service="test", prev_hash=self.last_hash)
            self.last_hash = envelope["hash"]
            envelopes.append(envelope)
        self.commits.append(envelopes)
        return envelopes

    async def apply(self, projection: Projection, commits: list[list[dict[str, Any]]] | None = None) -> None:
        for envelopes in commits if commits is not None else self.commits:
            await projection.apply_commit(self.tenant, self.run_id, envelopes)


def ready(step_id: str, step_type: str = "job") -> Callable[[Run], None]:
    return lambda run: run.mark_step_ready(ev.StepReady(
        step_id=step_id, step_type=step_type,
        topic="work.do" if step_type == "job" else None, input={"step": step_id}, job_hash=jh(step_id)))


def allow(step_id: str, decision: ev.Decision = "allow") -> Callable[[Run], None]:
    return lambda run: run.decide_policy(ev.PolicyDecided(
        step_id=step_id, decision=decision, snapshot_id="builtin@1", rule_ids=["builtin.allow"], job_hash=jh(step_id),
        reason="" if decision == "allow" else "policy says so", approver_role="approver"))


def dispatch(step_id: str, attempt: int) -> Callable[[Run], None]:
    return lambda run: run.dispatch_step(ev.StepDispatched(
        step_id=step_id, attempt=attempt, job_id=f"{run.run_id}:{step_id}@{attempt}", topic="work.do"))


def fail(step_id: str, attempt: int, final: bool = False) -> Callable[[Run], None]:
    return lambda run: run.fail_step(ev.StepFailed(step_id=step_id, attempt=attempt, final=final, worker="w1",
                                                   error=JobError(message="boom", retryable=not final)))


def retry(step_id: str, attempt: int) -> Callable[[Run], None]:
    return lambda run: run.schedule_retry(ev.RetryScheduled(
        step_id=step_id, attempt=attempt, due_at=datetime.now(UTC) + timedelta(milliseconds=200), delay_ms=200))


def heartbeat(step_id: str, attempt: int) -> Callable[[Run], None]:
    return lambda run: run.record_heartbeat(ev.StepHeartbeat(step_id=step_id, attempt=attempt, worker="w2",
                                                             progress="half way"))


def succeed(step_id: str, attempt: int, output: Any = None) -> Callable[[Run], None]:
    return lambda run: run.succeed_step(ev.StepSucceeded(step_id=step_id, attempt=attempt, output=output,
                                                         worker="w2"))


def request(step_id: str) -> Callable[[Run], None]:
    return lambda run: run.request_approval(ev.ApprovalRequested(
        step_id=step_id, job_hash=jh(step_id), snapshot_id="builtin@1", approver_role="approver",
        prompt=f"approve {step_id}", expires_at=datetime.now(UTC) + timedelta(hours=1)))


def grant(step_id: str) -> Callable[[Run], None]:
    return lambda run: run.grant_approval(ev.ApprovalGranted(
        step_id=step_id, job_hash=jh(step_id), approver="alice", role="approver", reason="ok"), datetime.now(UTC))


def reject(step_id: str) -> Callable[[Run], None]:
    return lambda run: run.reject_approval(ev.ApprovalRejected(
        step_id=step_id, job_hash=jh(step_id), approver="bob", role="approver", reason="no"))


def full_run(tenant: str = TENANT) -> Log:
    """A job step with one failed attempt and a retry, then an approval step, then success."""
    log = Log(tenant)
    log.commit(ready("a"), ready("gate", "approval"))
    log.commit(allow("a"))
    log.commit(dispatch("a", 1))
    log.commit(fail("a", 1), retry("a", 2))
    log.commit(dispatch("a", 2), heartbeat("a", 2), succeed("a", 2, {"y": 2}))
    log.commit(allow("gate"), request("gate"))
    log.commit(grant("gate"), succeed("gate", 0, {"approved_by": "alice"}))
    log.commit(lambda run: run.succeed(ev.RunSucceeded(output={"done": True})))
    return log


def rehash(envelope: dict[str, Any]) -> dict[str, Any]:
    envelope["hash"] = codec.event_hash(envelope)
    return envelope


@pytest.fixture
async def proj() -> AsyncIterator[Projection]:
    projection = Projection(":memory:")
    await projection.open()
    yield projection
    await projection.close()


# -- queries -------------------------------------------------------------------------------------
async def test_timeline_summaries_and_details(proj: Projection) -> None:
    log = full_run()
    await log.apply(proj)
    timeline = await proj.timeline(log.run_id)
    assert timeline is not None
    assert [e["seq"] for e in timeline] == list(range(1, len(timeline) + 1))
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in timeline:
        by_type.setdefault(entry["type"], []).append(entry)
        assert entry["service"] == "test" and entry["at"] and entry["hash"] and entry["problems"] == []

    assert by_type["RunStarted"][0]["summary"] == "run started: wf v1 by tester"
    policy = by_type["PolicyDecided"][0]
    assert policy["summary"] == "policy allow (rules builtin.allow, snapshot builtin@1)"
    assert policy["step_id"] == "a"
    assert policy["details"] == {"decision": "allow", "snapshot_id": "builtin@1", "rule_ids": ["builtin.allow"],
                                 "job_hash": jh("a"), "approver_role": "approver"}
    dispatched = by_type["StepDispatched"]
    assert dispatched[1]["summary"] == f"dispatched attempt 2 (job {log.run_id}:a@2)"
    assert dispatched[1]["attempt"] == 2
    assert by_type["StepFailed"][0]["summary"] == "failed attempt 1: boom (retry)"
    assert by_type["RetryScheduled"][0]["summary"] == "retry 2 scheduled in 200 ms"
    requested = by_type["ApprovalRequested"][0]
    assert requested["summary"] == f"approval requested from role approver (hash {jh('gate')[:6]}…)"
    assert requested["details"]["job_hash"] == jh("gate")
    granted = by_type["ApprovalGranted"][0]
    assert granted["summary"] == "approved by alice (approver): ok"
    assert granted["details"]["job_hash"] == jh("gate")
    assert by_type["StepHeartbeat"][0]["summary"] == "heartbeat, attempt 2 from w2: half way"
    assert by_type["RunSucceeded"][0]["summary"] == "run succeeded"
    assert "data" not in timeline[0]
    with_data = await proj.timeline(log.run_id, with_data=True)
    assert with_data is not None and with_data[0]["data"]["workflow_id"] == "wf"


async def test_status_lists_steps_in_order_with_attempts_decisions_and_approvals(proj: Projection) -> None:
    log = full_run()
    await log.apply(proj)
    status = await proj.status(log.run_id)
    assert status is not None
    assert status["status"] == "succeeded" and status["chain_ok"] is True and status["problems"] == []
    assert status["tenant"] == TENANT and status["workflow_id"] == "wf" and status["workflow_version"] == "1"
    assert status["requested_by"] == "tester" and status["ended_at"] is not None
    assert status["last_seq"] == sum(len(c) for c in log.commits)
    assert status["head_hash"] == log.last_hash
    a, gate = status["steps"]
    assert a["step_id"] == "a" and gate["step_id"] == "gate"
    assert a["status"] == "succeeded" and a["attempt"] == 2 and a["attempts"] == 2
    assert [h["outcome"] for h in a["history"]] == ["failed", "succeeded"]
    assert a["history"][0]["error"] == "boom" and a["history"][1]["worker"] == "w2"
    assert a["decision"] == {"decision": "allow", "snapshot_id": "builtin@1", "rule_ids": ["builtin.allow"]}
    assert a["output"] == {"y": 2} and a["error"] is None and a["job_hash"] == jh("a")
    assert gate["status"] == "succeeded" and gate["step_type"] == "approval" and gate["attempts"] == 0
    assert gate["approval_status"] == "granted" and gate["approver"] == "alice"
    assert gate["approval"]["status"] == "granted" and gate["approval"]["job_hash"] == jh("gate")
    assert gate["approval"]["decided_at"] is not None
    assert await proj.status(log.run_id, tenant="someone-else") is None
    assert await proj.status(str(uuid.uuid4())) is None
    assert await proj.timeline(str(uuid.uuid4())) is None


async def test_status_while_running(proj: Projection) -> None:
    log = Log()
    log.commit(ready("a"), ready("b"))
    log.commit(allow("a"), allow("b", "require_approval"))
    log.commit(dispatch("a", 1), heartbeat("a", 1))
    await log.apply(proj)
    status = await proj.status(log.run_id)
    assert status is not None and status["status"] == "running"
    steps = {st["step_id"]: st for st in status["steps"]}
    assert steps["a"]["status"] == "running" and steps["a"]["history"][0]["outcome"] == "running"
    assert steps["b"]["status"] == "awaiting_approval" and steps["b"]["decision"]["decision"] == "require_approval"


async def test_approvals_pending_oldest_first(proj: Projection) -> None:
    first, second, other = Log(), Log(), Log(tenant="t-other")
    for log in (first, second, other):
        log.commit(ready("gate", "approval"))
        log.commit(allow("gate"), request("gate"))
    for log in (first, other, second):  # request order: first, second, other (by event time)
        await log.apply(proj)
    pending = await proj.approvals()
    mine = [p for p in pending if p["run_id"] in {first.run_id, second.run_id, other.run_id}]
    assert [p["run_id"] for p in mine] == [first.run_id, second.run_id, other.run_id]
    p = mine[0]
    assert p["step_id"] == "gate" and p["job_hash"] == jh("gate") and p["snapshot_id"] == "builtin@1"
    assert p["approver_role"] == "approver" and p["prompt"] == "approve gate" and p["tenant"] == TENANT
    assert p["requested_at"] and p["expires_at"]
    assert [x["run_id"] for x in await proj.approvals(tenant="t-other")] == [other.run_id]

    await first.apply(proj, [first.commit(grant("gate"), succeed("gate", 0))])
    await second.apply(proj, [second.commit(reject("gate"), fail("gate", 0, final=True))])
    await other.apply(proj, [other.commit(lambda run: run.cancel(ev.RunCancelled(by="ops", reason="stop")))])
    assert await proj.approvals(tenant=TENANT) == []
    assert await proj.approvals(tenant="t-other") == []  # the run was cancelled: nothing to decide
    status = await proj.status(second.run_id)
    assert status is not None
    gate = status["steps"][0]
    assert gate["approval_status"] == "rejected" and gate["approver"] == "bob" and gate["status"] == "failed"
    cancelled = await proj.status(other.run_id)
    assert cancelled is not None and cancelled["status"] == "cancelled" and cancelled["reason"] == "stop"
    assert cancelled["steps"][0]["status"] == "cancelled"
    timeline = await proj.timeline(second.run_id)
    assert timeline is not None
    assert [e["summary"] for e in timeline if e["type"] == "ApprovalRejected"] == ["rejected by bob (approver): no"]


async def test_runs_newest_first_with_filters(proj: Projection) -> None:
    old, new, other = Log(), Log(), Log(tenant="t-runs-other", workflow_id="wf2")
    for log in (new, other, old):
        await log.apply(proj)
    await new.apply(proj, [new.commit(lambda run: run.fail(ev.RunFailed(reason="nope")))])
    ids = [r["run_id"] for r in await proj.runs(tenant=TENANT)]
    assert ids.index(new.run_id) < ids.index(old.run_id)
    everything = [r["run_id"] for r in await proj.runs()]
    assert everything[:3] == [other.run_id, new.run_id, old.run_id]
    failed = await proj.runs(tenant=TENANT, status="failed")
    assert [r["run_id"] for r in failed] == [new.run_id]
    assert failed[0]["reason"] == "nope" and failed[0]["chain_ok"] is True
    assert [r["run_id"] for r in await proj.runs(workflow_id="wf2")] == [other.run_id]
    assert len(await proj.runs(limit=1)) == 1


# -- idempotency and the chain ---------------------------------------------------------------
async def test_reapplying_commits_changes_nothing(proj: Projection) -> None:
    log = full_run()
    await log.apply(proj)
    status, timeline = await proj.status(log.run_id), await proj.timeline(log.run_id)
    total = sum(len(c) for c in log.commits)
    for envelopes in reversed(log.commits):  # every commit redelivered, in any order
        result = await proj.apply_commit(log.tenant, log.run_id, envelopes)
        assert result.applied == 0 and result.skipped == len(envelopes) and result.chain_ok
    # and a commit that overlaps what is known and adds one more event
    extra = Log()
    extra.commit(ready("a"))
    extra.commit(allow("a"))
    await proj.apply_commit(extra.tenant, extra.run_id, extra.commits[0])
    result = await proj.apply_commit(extra.tenant, extra.run_id, extra.commits[0] + extra.commits[1] + extra.commits[2])
    assert (result.skipped, result.applied, result.chain_ok) == (1, 2, True)
    assert await proj.status(log.run_id) == status
    assert await proj.timeline(log.run_id) == timeline
    run = (await proj.runs(tenant=TENANT))[-1]
    assert run["chain_ok"] and (await proj.status(log.run_id) or {})["last_seq"] == total


async def test_broken_link_is_recorded_and_flagged(proj: Projection) -> None:
    log = full_run()
    commits = copy.deepcopy(log.commits)
    bad = commits[3][0]  # first event of the 4th commit
    bad["prev_hash"] = "e" * 64
    rehash(bad)  # its own hash is consistent: only the link to its predecessor is broken
    for envelopes in commits:
        await proj.apply_commit(log.tenant, log.run_id, envelopes)
    status = await proj.status(log.run_id)
    assert status is not None and status["chain_ok"] is False and status["problem_count"] >= 1
    assert any(f"seq {bad['seq']}: broken_link" in p for p in status["problems"])
    timeline = await proj.timeline(log.run_id)
    assert timeline is not None
    entry = timeline[bad["seq"] - 1]
    assert entry["seq"] == bad["seq"] and entry["problems"] and entry["problems"][0].startswith("broken_link")
    assert len(timeline) == status["last_seq"]  # everything recorded, nothing crashed
    assert status["status"] == "succeeded"  # projection went on after the bad event


async def test_edited_event_is_a_hash_mismatch(proj: Projection) -> None:
    log = full_run()
    commits = copy.deepcopy(log.commits)
    commits[2][0]["data"]["snapshot_id"] = "forged@9"  # edited, hash not recomputed
    for envelopes in commits:
        await proj.apply_commit(log.tenant, log.run_id, envelopes)
    status = await proj.status(log.run_id)
    assert status is not None and status["chain_ok"] is False
    assert any("hash_mismatch" in p for p in status["problems"])


async def test_gap_is_flagged_or_held(proj: Projection) -> None:
    log = full_run()
    held = await proj.apply_commit(log.tenant, log.run_id, log.commits[1], hold_gaps=True)
    assert held.gap and held.applied == 0
    assert await proj.status(log.run_id) is None  # nothing written
    await proj.apply_commit(log.tenant, log.run_id, log.commits[0])
    held = await proj.apply_commit(log.tenant, log.run_id, log.commits[2], hold_gaps=True)
    assert held.gap and held.last_seq == 1
    result = await proj.apply_commit(log.tenant, log.run_id, log.commits[2])  # a real gap: recorded, flagged
    assert result.applied == len(log.commits[2]) and not result.chain_ok
    assert any("seq_gap" in p for p in result.problems)
    # the missing commit arriving late is a repeat of a seq already passed: still flagged, never rewritten
    late = await proj.apply_commit(log.tenant, log.run_id, log.commits[1])
    assert late.applied == 0 and not late.chain_ok
    status = await proj.status(log.run_id)
    assert status is not None and status["chain_ok"] is False


async def test_fork_with_a_different_event_at_a_known_seq_is_flagged(proj: Projection) -> None:
    log = full_run()
    await log.apply(proj, log.commits[:3])
    forged = copy.deepcopy(log.commits[2])
    forged[0]["data"]["rule_ids"] = ["forged"]
    rehash(forged[0])
    result = await proj.apply_commit(log.tenant, log.run_id, forged)
    assert result.applied == 0 and not result.chain_ok
    timeline = await proj.timeline(log.run_id)
    assert timeline is not None and timeline[-1]["details"]["rule_ids"] == ["builtin.allow"]  # original kept


async def test_unknown_event_type_is_tolerated(proj: Projection) -> None:
    log = Log()
    await log.apply(proj)
    future = rehash({"run_id": log.run_id, "tenant": log.tenant, "seq": 2, "type": "QuantumEntangled",
                     "at": datetime.now(UTC).isoformat(), "service": "future", "step_id": None, "attempt": None,
                     "data": {"spin": "up"}, "prev_hash": log.last_hash})
    result = await proj.apply_commit(log.tenant, log.run_id, [future])
    assert result.applied == 1 and result.chain_ok
    timeline = await proj.timeline(log.run_id, with_data=True)
    assert timeline is not None
    assert timeline[1]["type"] == "QuantumEntangled" and timeline[1]["summary"] == UNKNOWN_TYPE_SUMMARY
    assert timeline[1]["data"] == {"spin": "up"} and timeline[1]["problems"][0].startswith("unknown_type")
    status = await proj.status(log.run_id)
    assert status is not None and status["chain_ok"] is True and status["last_seq"] == 2


async def test_odd_input_never_raises(proj: Projection) -> None:
    log = Log()
    await log.apply(proj)
    run_id = log.run_id
    odd: list[Any] = [
        "not an object",
        {"seq": "three"},
        rehash({"run_id": run_id, "tenant": TENANT, "seq": 2, "type": "StepFailed", "at": "yesterday",
                "service": "x", "data": {"step_id": "ghost", "error": "plain string", "attempt": "one"},
                "prev_hash": log.last_hash}),
        {"run_id": run_id, "tenant": TENANT, "seq": 3, "type": "StepReady", "data": ["not", "a", "dict"]},
        {"run_id": "another-run", "tenant": "x", "seq": 4, "type": "RunStarted", "data": {}},
    ]
    result = await proj.apply_commit(TENANT, run_id, odd)
    assert result.applied == 3 and result.skipped == 2 and not result.chain_ok
    status = await proj.status(run_id)
    assert status is not None and status["last_seq"] == 4 and status["status"] == "running"
    ghost = [st for st in status["steps"] if st["step_id"] == "ghost"]
    assert ghost and ghost[0]["error"] == "plain string"
    timeline = await proj.timeline(run_id)
    assert timeline is not None and [e["seq"] for e in timeline] == [1, 2, 3, 4]
    # a commit for a run that never started is kept too
    stray = await proj.apply_commit(TENANT, "stray-run", [{"seq": 1, "type": "StepSkipped", "data": {}}])
    assert stray.applied == 1 and not stray.chain_ok
    assert await proj.apply_commit(TENANT, "empty", []) is not None


# -- files -------------------------------------------------------------------------------------
async def test_file_projection_uses_wal_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "auditor.sqlite3"
    log = full_run()
    async with Projection(path) as projection:
        await log.apply(projection)
        await projection.apply_commit(log.tenant, log.run_id, log.commits[-1], stream_seq=42)
        before = await projection.status(log.run_id)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    async with Projection(path) as projection:
        assert await projection.status(log.run_id) == before
        position = await projection.position()
        assert position["stream_seq"] == 42 and position["commits"] == 1
        await projection.wipe()
        assert await projection.runs() == [] and (await projection.position())["stream_seq"] == 0


class _FakeJetStream:
    """Just enough of a JetStreamContext for :meth:`Projection.bind_stream`."""

    def __init__(self, created: datetime) -> None:
        self.created = created

    async def stream_info(self, name: str) -> Any:
        assert name == "IL_EVENTS"
        return type("Info", (), {"created": self.created})()


async def test_a_projection_of_another_stream_is_wiped(proj: Projection) -> None:
    first = _FakeJetStream(datetime(2030, 1, 1, tzinfo=UTC))
    assert await proj.bind_stream(first) is False  # type: ignore[arg-type]
    log = full_run()
    await log.apply(proj)
    assert await proj.bind_stream(first) is False  # type: ignore[arg-type]
    await proj.wipe(tenants=["nobody"])
    assert await proj.status(log.run_id) is not None
    assert (await proj.position())["stream_created"] == first.created.isoformat()
    recreated = _FakeJetStream(datetime(2030, 1, 2, tzinfo=UTC))
    assert await proj.bind_stream(recreated) is True  # type: ignore[arg-type]
    assert await proj.status(log.run_id) is None and await proj.runs() == []
    assert (await proj.position())["stream_created"] == recreated.created.isoformat()


async def test_an_unstorable_event_does_not_fail_the_commits_written_with_it(proj: Projection) -> None:
    good, odd = Log(), Log()
    good.commit(ready("a"))
    odd.commit(ready("a"))
    # a lone surrogate cannot come off the wire (the JSON decoder refuses it) but a caller can pass one
    bad_step = {"run_id": odd.run_id, "tenant": TENANT, "seq": 3, "type": "StepSkipped",
                "at": datetime.now(UTC).isoformat(), "service": "x", "step_id": "s\ud800", "attempt": None,
                "data": {"step_id": "s\ud800", "reason": "lone surrogate"}, "prev_hash": odd.last_hash,
                "hash": "b" * 64}
    huge = {"run_id": odd.run_id, "tenant": TENANT, "seq": 4, "type": "StepHeartbeat", "at": "x", "service": "x",
            "attempt": 2**70, "data": {"step_id": "a", "attempt": 2**70}, "prev_hash": bad_step["hash"], "hash": "h"}
    # queued together: one group-commit transaction
    results = await asyncio.gather(
        proj.apply_commit(good.tenant, good.run_id, good.commits[0]),
        proj.apply_commit(odd.tenant, odd.run_id, odd.commits[0] + odd.commits[1] + [bad_step, huge]),
        proj.apply_commit(good.tenant, good.run_id, good.commits[1]),
    )
    assert [r.applied for r in results] == [1, 4, 1]
    assert results[0].chain_ok and results[2].chain_ok and not results[1].chain_ok
    good_status = await proj.status(good.run_id)
    assert good_status is not None and good_status["steps"][0]["status"] == "ready"
    timeline = await proj.timeline(odd.run_id)
    assert timeline is not None and [e["seq"] for e in timeline] == [1, 2, 3, 4]
    assert timeline[2]["summary"].startswith("event could not be recorded")
    assert timeline[3]["attempt"] is None and timeline[3]["problems"]
    # the run's log goes on after them
    status = await proj.status(odd.run_id)
    assert status is not None and status["last_seq"] == 4 and status["head_hash"] == "h"


# -- a person's interventions and feedback (issue 17) ---------------------------------------------
async def test_interventions_and_feedback_are_projected_and_replay_the_same(proj: Projection) -> None:
    who = {"by": "olga", "via": "cli", "reason": "because"}
    log = Log()
    log.commit(ready("a"), allow("a"), dispatch("a", 1), fail("a", 1, final=True),
               lambda run: run.fail(ev.RunFailed(reason="a failed", step_id="a")))
    log.commit(lambda run: run.resume(ev.RunResumed(steps=["a"], **who)),
               lambda run: run.retry_step(ev.StepRetryRequested(step_id="a", attempt=1, job_hash=jh("a"), **who)),
               lambda run: run.pause(ev.RunPaused(**who)))
    await log.apply(proj)
    status = await proj.status(log.run_id)
    assert status is not None and status["status"] == "running" and status["paused"] and not status["ended_at"]
    assert {st["step_id"]: st["status"] for st in status["steps"]} == {"a": "ready"}
    log.commit(lambda run: run.unpause(ev.RunUnpaused(**who)), allow("a"), dispatch("a", 2), succeed("a", 2, {"v": 1}),
               lambda run: run.succeed(ev.RunSucceeded()))
    digest = codec.sha256_hex(codec.canonical_json({"v": 1}))
    log.commit(lambda run: run.give_feedback(ev.FeedbackGiven(step_id="a", by="olga", output_hash=digest, attempt=2,
                                                              score=4, correction={"v": 2}, note="close")))
    await log.apply(proj, log.commits[-2:])
    status = await proj.status(log.run_id)
    assert status is not None and status["status"] == "succeeded" and not status["paused"]
    rows = await proj.feedback(run_id=log.run_id)
    assert [(r["by"], r["score"], r["correction"], r["output"], r["output_hash"], r["attempt"]) for r in rows] == [
        ("olga", 4.0, {"v": 2}, {"v": 1}, digest, 2)]
    assert await proj.feedback(workflow_id="wf", tenant=TENANT) == rows
    assert await proj.feedback(run_id=log.run_id, tenant="t-other") == []
    timeline = await proj.timeline(log.run_id)
    assert timeline is not None
    summaries = [row["summary"] for row in timeline]
    assert "run resumed from a by olga (via cli): because" in summaries
    await proj.wipe()
    assert await proj.feedback(run_id=log.run_id) == []
    await log.apply(proj)
    assert await proj.feedback(run_id=log.run_id) == rows
