"""The Run aggregate without I/O: commands, refusals, and replay of what they produced."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from pydantic import ValidationError

from interlock.contracts import events as ev
from interlock.contracts.messages import JobError
from interlock.core import codec
from interlock.core.run import TERMINAL_RUN, TERMINAL_STEP, IllegalTransition, Run
from interlock.core.verify import verify_envelopes

TENANT = "t-unit"
WRONG_HASH = "f" * 64


# -- helpers ---------------------------------------------------------------------------------
def jh(step_id: str) -> str:
    return codec.job_hash(workflow_id="wf", workflow_version="1", step_id=step_id, topic="work.do",
                          input={"step": step_id})


def started(tenant: str = TENANT) -> ev.RunStarted:
    return ev.RunStarted(workflow_id="wf", workflow_version="1", definition_hash="d" * 64,
                         idempotency_key=uuid.uuid4().hex, tenant=tenant, input={"x": 1})


def new_run() -> Run:
    return Run.start(uuid.uuid4(), started())


def ready(step_id: str, **kw: Any) -> ev.StepReady:
    return ev.StepReady(step_id=step_id, topic="work.do", input={"step": step_id}, job_hash=jh(step_id), **kw)


def decided(step_id: str, decision: ev.Decision = "allow", job_hash: str | None = None) -> ev.PolicyDecided:
    return ev.PolicyDecided(step_id=step_id, decision=decision, snapshot_id="snap-1", rule_ids=["r1"],
                            job_hash=job_hash or jh(step_id), approver_role="lead",
                            reason="" if decision == "allow" else "policy says so")


def dispatched(step_id: str, attempt: int = 1) -> ev.StepDispatched:
    return ev.StepDispatched(step_id=step_id, attempt=attempt, job_id=f"run:{step_id}@{attempt}",
                             topic="work.do", deadline=datetime(2030, 1, 1, tzinfo=UTC))


def failed(step_id: str, attempt: int = 1, final: bool = False) -> ev.StepFailed:
    return ev.StepFailed(step_id=step_id, attempt=attempt, final=final,
                         error=JobError(message="boom", retryable=not final), worker="w1")


def retry(step_id: str, attempt: int = 2) -> ev.RetryScheduled:
    return ev.RetryScheduled(step_id=step_id, attempt=attempt, due_at=datetime(2030, 1, 1, tzinfo=UTC),
                             delay_ms=100)


def requested(step_id: str, expires_at: datetime | None = None, job_hash: str | None = None
              ) -> ev.ApprovalRequested:
    return ev.ApprovalRequested(step_id=step_id, job_hash=job_hash or jh(step_id), snapshot_id="snap-1",
                                approver_role="lead", prompt="ok?", expires_at=expires_at)


def released(run: Run, step_id: str) -> None:
    run.mark_step_ready(ready(step_id))
    run.decide_policy(decided(step_id))


def running(run: Run, step_id: str) -> None:
    released(run, step_id)
    run.dispatch_step(dispatched(step_id))


def chain(run: Run, envelopes: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Append the run's pending events to ``envelopes`` as a hash chain (what the store does)."""
    envelopes = [] if envelopes is None else envelopes
    prev = envelopes[-1]["hash"] if envelopes else ev.GENESIS_HASH
    for domain_event in run.collect_events():
        envelope = codec.envelope_from_event(domain_event, tenant=TENANT, service="unit", prev_hash=prev)
        envelopes.append(envelope)
        prev = envelope["hash"]
    return envelopes


def replay(envelopes: list[dict[str, Any]]) -> Run:
    """Rebuild a run the way the store does: through the stored JSON form."""
    stored = codec.decode_commit_raw(codec.encode_commit(envelopes[0]["run_id"], TENANT, envelopes))
    run = None
    for envelope in stored["events"]:
        run = codec.event_from_envelope(envelope).mutate(run)
    assert isinstance(run, Run)
    return run


def state(run: Run) -> dict[str, Any]:
    """Everything a run holds, comparable with ``==`` (every StepState field included)."""
    out = {k: v for k, v in vars(run).items() if k not in ("_pending_events", "steps", "compensation")}
    out["steps"] = {sid: dataclasses.asdict(step) for sid, step in run.steps.items()}
    out["compensation"] = dataclasses.asdict(run.compensation) if run.compensation else None
    out["status"] = run.status
    out["version"] = run.version
    return out


def refused(action: Callable[[], None], *words: str) -> IllegalTransition:
    with pytest.raises(IllegalTransition) as info:
        action()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    return info.value


def assert_replays(run: Run, envelopes: list[dict[str, Any]]) -> None:
    assert state(replay(envelopes)) == state(run)
    report = verify_envelopes(envelopes)
    assert report.ok, report.problems


# -- job steps -------------------------------------------------------------------------------
def test_happy_path_job_step() -> None:
    run = new_run()
    log = chain(run)
    run.mark_step_ready(ready("a"))
    assert run.steps["a"].status == "ready"
    run.decide_policy(decided("a"))
    assert run.steps["a"].status == "released"
    run.dispatch_step(dispatched("a"))
    step = run.steps["a"]
    assert (step.status, step.attempt, step.job_id) == ("dispatched", 1, "run:a@1")
    run.record_heartbeat(ev.StepHeartbeat(step_id="a", attempt=1, worker="w1", progress="half"))
    assert step.status == "running" and step.last_heartbeat_at is not None
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=1, output={"ok": True}, worker="w1"))
    assert step.status == "succeeded" and step.output == {"ok": True} and step.terminal
    run.succeed(ev.RunSucceeded(output={"done": 1}))
    assert run.status == "succeeded" and run.terminal and run.result == {"done": 1}
    assert run.ended_at is not None
    log = chain(run, log)
    assert [e["type"] for e in log] == ["RunStarted", "StepReady", "PolicyDecided", "StepDispatched",
                                        "StepHeartbeat", "StepSucceeded", "RunSucceeded"]
    assert [e["seq"] for e in log] == list(range(1, 8)) and run.version == 7
    assert log[3]["step_id"] == "a" and log[3]["attempt"] == 1
    assert_replays(run, log)


def test_succeed_run_needs_every_step_finished() -> None:
    run = new_run()
    running(run, "a")
    run.mark_step_ready(ready("b"))
    refused(lambda: run.succeed(ev.RunSucceeded()), "steps not finished: a, b")
    assert run.status == "running"


def test_step_commands_need_a_ready_step() -> None:
    run = new_run()
    refused(lambda: run.dispatch_step(dispatched("nope")), "not been made ready", "'nope'")
    run.mark_step_ready(ready("a"))
    refused(lambda: run.mark_step_ready(ready("a")), "already ready")
    refused(lambda: run.dispatch_step(dispatched("a")), "step is ready, expected released or retry_wait")
    refused(lambda: run.decide_policy(decided("a", job_hash=WRONG_HASH)), "another job hash")
    refused(lambda: run.mark_step_ready(ready("c", parent_id="p")), "parent 'p' was not expanded")


def test_for_each_expansion() -> None:
    run = new_run()
    run.expand_step(ev.StepExpanded(step_id="p", count=2))
    refused(lambda: run.expand_step(ev.StepExpanded(step_id="p", count=2)), "already started")
    for i in range(2):
        run.mark_step_ready(ready(f"p-{i}", parent_id="p"))
    assert run.steps["p"].status == "expanded" and run.steps["p"].item_count == 2
    assert run.steps["p-1"].parent_id == "p"
    # the fan-out parent needs no job: it succeeds with attempt 0 once
    run.succeed_step(ev.StepSucceeded(step_id="p", attempt=0, output=[1, 2]))
    refused(lambda: run.succeed_step(ev.StepSucceeded(step_id="p", attempt=0)), "step is succeeded")


# -- approvals -------------------------------------------------------------------------------
def gated(run: Run, step_id: str = "a", expires_at: datetime | None = None) -> None:
    run.mark_step_ready(ready(step_id))
    run.decide_policy(decided(step_id, "require_approval"))
    assert run.steps[step_id].status == "awaiting_approval"
    run.request_approval(requested(step_id, expires_at))


def test_approval_granted_with_matching_hash_releases() -> None:
    run = new_run()
    log = chain(run)
    gated(run, expires_at=datetime.now(UTC) + timedelta(hours=1))
    refused(lambda: run.dispatch_step(dispatched("a")), "step is awaiting_approval")
    refused(lambda: run.request_approval(requested("a")), "already pending")
    run.grant_approval(ev.ApprovalGranted(step_id="a", job_hash=jh("a"), approver="ann", role="lead",
                                          reason="fine"), now=datetime.now(UTC))
    step = run.steps["a"]
    assert step.status == "released"
    assert step.approval is not None and step.approval.status == "granted" and step.approval.approver == "ann"
    run.dispatch_step(dispatched("a"))
    assert step.status == "dispatched"
    assert_replays(run, chain(run, log))


def test_approval_with_mismatched_job_hash_is_refused() -> None:
    run = new_run()
    gated(run)
    version = run.version
    error = refused(lambda: run.grant_approval(
        ev.ApprovalGranted(step_id="a", job_hash=WRONG_HASH, approver="ann", role="lead"), now=datetime.now(UTC)),
        "grant_approval", "job hash", WRONG_HASH[:12], jh("a")[:12])
    assert error.step_id == "a" and error.command == "grant_approval"
    refused(lambda: run.reject_approval(
        ev.ApprovalRejected(step_id="a", job_hash=WRONG_HASH, approver="ann", role="lead")), "job hash")
    refused(lambda: run.request_approval(requested("b")), "not been made ready")
    assert run.version == version and run.steps["a"].status == "awaiting_approval"


def test_expired_approval_request_is_refused() -> None:
    run = new_run()
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    gated(run, expires_at=expires)
    version = run.version
    grant = ev.ApprovalGranted(step_id="a", job_hash=jh("a"), approver="ann", role="lead")
    refused(lambda: run.grant_approval(grant, now=expires), "expired")
    refused(lambda: run.grant_approval(grant, now=expires + timedelta(seconds=1)), "expired")
    assert run.version == version
    run.expire_approval(ev.ApprovalExpired(step_id="a", job_hash=jh("a")))
    assert run.steps["a"].approval is not None and run.steps["a"].approval.status == "expired"
    refused(lambda: run.grant_approval(grant, now=expires - timedelta(hours=1)), "no approval request is pending")
    # a new request may be made and granted in time
    run.request_approval(requested("a", expires + timedelta(days=1)))
    run.grant_approval(grant, now=expires)
    assert run.steps["a"].status == "released"


def test_approval_by_the_wrong_role_is_refused() -> None:
    run = new_run()
    gated(run)
    version = run.version
    refused(lambda: run.grant_approval(ev.ApprovalGranted(step_id="a", job_hash=jh("a"), approver="bob",
                                                          role="intern"), now=datetime.now(UTC)),
            "role 'intern' may not decide, 'lead' may")
    refused(lambda: run.reject_approval(ev.ApprovalRejected(step_id="a", job_hash=jh("a"), approver="bob",
                                                            role="intern")), "role 'intern'")
    assert run.version == version
    run.reject_approval(ev.ApprovalRejected(step_id="a", job_hash=jh("a"), approver="ann", role="lead",
                                            reason="no"))
    step = run.steps["a"]
    assert step.status == "awaiting_approval" and step.approval is not None and step.approval.status == "rejected"
    refused(lambda: run.dispatch_step(dispatched("a")), "awaiting_approval")


def test_approval_step() -> None:
    run = new_run()
    run.mark_step_ready(ready("ok", step_type="approval"))
    run.decide_policy(decided("ok"))  # an approval step waits for a person even when allowed
    assert run.steps["ok"].status == "awaiting_approval"
    run.request_approval(requested("ok"))
    run.grant_approval(ev.ApprovalGranted(step_id="ok", job_hash=jh("ok"), approver="ann", role="lead"),
                       now=datetime.now(UTC))
    run.succeed_step(ev.StepSucceeded(step_id="ok", attempt=0))
    assert run.steps["ok"].status == "succeeded"


def test_policy_deny() -> None:
    run = new_run()
    log = chain(run)
    run.mark_step_ready(ready("a"))
    run.decide_policy(decided("a", "deny"))
    assert run.steps["a"].status == "denied" and run.steps["a"].terminal
    refused(lambda: run.dispatch_step(dispatched("a")), "step is denied")
    run.deny(ev.RunDenied(step_id="a", reason="policy says so", rule_ids=["r1"], snapshot_id="snap-1"))
    assert run.status == "denied" and run.reason == "policy says so"
    refused(lambda: run.deny(ev.RunDenied(step_id="a", reason="again")), "run is denied")
    assert_replays(run, chain(run, log))


# -- retries, timeouts, late results ----------------------------------------------------------
def test_retry_after_a_failure_that_is_not_final() -> None:
    run = new_run()
    log = chain(run)
    running(run, "a")
    run.fail_step(failed("a", 1, final=False))
    step = run.steps["a"]
    assert step.status == "dispatched" and step.error is not None and step.error.message == "boom"
    refused(lambda: run.schedule_retry(retry("a", 3)), "attempt 3 is not next")
    refused(lambda: run.dispatch_step(dispatched("a", 2)), "step is dispatched")
    run.schedule_retry(retry("a", 2))
    assert step.status == "retry_wait" and step.retry_due_at == datetime(2030, 1, 1, tzinfo=UTC)
    refused(lambda: run.dispatch_step(dispatched("a", 1)), "attempt 1 is not next (2)")
    refused(lambda: run.dispatch_step(dispatched("a", 3)), "attempt 3 is not next (2)")
    run.dispatch_step(dispatched("a", 2))
    assert (step.status, step.attempt, step.retry_due_at) == ("dispatched", 2, None)
    refused(lambda: run.record_heartbeat(ev.StepHeartbeat(step_id="a", attempt=1)), "attempt 1 is not current")
    refused(lambda: run.succeed_step(ev.StepSucceeded(step_id="a", attempt=1)), "attempt 1 is not running")
    refused(lambda: run.fail_step(failed("a", 1)), "attempt 1 is not current")
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=2, output="second time"))
    assert step.status == "succeeded" and step.error is None
    assert_replays(run, chain(run, log))


def test_final_failure_fails_the_step() -> None:
    run = new_run()
    running(run, "a")
    run.fail_step(failed("a", 1, final=True))
    assert run.steps["a"].status == "failed"
    refused(lambda: run.fail_step(failed("a", 1, final=True)), "step is failed")
    refused(lambda: run.schedule_retry(retry("a", 2)), "step is failed")
    run.fail(ev.RunFailed(reason="a failed", step_id="a"))
    assert run.status == "failed" and run.reason == "a failed"


def test_step_timeout_then_retry() -> None:
    run = new_run()
    log = chain(run)
    running(run, "a")
    refused(lambda: run.time_out_step(ev.StepTimedOut(step_id="a", attempt=2)), "attempt 2 is not current")
    run.time_out_step(ev.StepTimedOut(step_id="a", attempt=1, reason="heartbeat"))
    assert run.steps["a"].status == "timed_out"
    refused(lambda: run.time_out_step(ev.StepTimedOut(step_id="a", attempt=1)), "step is timed_out")
    refused(lambda: run.record_heartbeat(ev.StepHeartbeat(step_id="a", attempt=1)), "step is timed_out")
    run.schedule_retry(retry("a", 2))
    run.dispatch_step(dispatched("a", 2))
    run.time_out_step(ev.StepTimedOut(step_id="a", attempt=2))
    run.fail_step(failed("a", 2, final=True))
    assert run.steps["a"].status == "failed"
    assert_replays(run, chain(run, log))


def test_run_timeout() -> None:
    run = new_run()
    running(run, "a")
    run.time_out(ev.RunTimedOut(timeout_ms=5000))
    assert run.status == "timed_out" and run.reason == "run exceeded 5000 ms"
    refused(lambda: run.time_out(ev.RunTimedOut(timeout_ms=5000)), "already timed_out")
    refused(lambda: run.cancel(ev.RunCancelled()), "already timed_out")


def test_late_result_only_for_an_older_attempt() -> None:
    run = new_run()
    log = chain(run)
    running(run, "a")
    late1 = ev.LateResultRecorded(step_id="a", attempt=1, ok=True, worker="slow")
    refused(lambda: run.record_late_result(late1), "the attempt is current")
    run.time_out_step(ev.StepTimedOut(step_id="a", attempt=1))
    run.schedule_retry(retry("a", 2))
    run.dispatch_step(dispatched("a", 2))
    before = state(run)
    run.record_late_result(late1)  # attempt 1 is older than the current attempt 2
    after = state(run)
    assert after.pop("_version") == before.pop("_version") + 1
    after.pop("_modified_on"), before.pop("_modified_on")
    after.pop("version"), before.pop("version")
    assert after == before  # evidence only: nothing else changed
    refused(lambda: run.record_late_result(ev.LateResultRecorded(step_id="a", attempt=2, ok=True)), "current")
    refused(lambda: run.record_late_result(ev.LateResultRecorded(step_id="a", attempt=3, ok=True)), "never dispatched")
    refused(lambda: run.record_late_result(ev.LateResultRecorded(step_id="b", attempt=1, ok=True)),
            "not been made ready")
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=2))
    # once the step is finished, a duplicate result of its last attempt is late too
    run.record_late_result(ev.LateResultRecorded(step_id="a", attempt=2, ok=True))
    assert run.steps["a"].status == "succeeded"
    assert_replays(run, chain(run, log))


def test_late_result_while_a_retry_waits() -> None:
    run = new_run()
    running(run, "a")
    run.time_out_step(ev.StepTimedOut(step_id="a", attempt=1))
    # a result of the timed-out attempt before the retry was scheduled still counts
    late = ev.LateResultRecorded(step_id="a", attempt=1, ok=True)
    refused(lambda: run.record_late_result(late), "the attempt is current")
    run.schedule_retry(retry("a", 2))
    # attempt 1 is over once the retry waits: its result is evidence only
    run.record_late_result(late)
    assert run.steps["a"].status == "retry_wait" and run.steps["a"].attempt == 1
    refused(lambda: run.succeed_step(ev.StepSucceeded(step_id="a", attempt=1)), "attempt 1 is not running")


def test_reused_output_of_a_rerun() -> None:
    data = started().model_copy(update={"rerun_of": "r-0", "reused_outputs": {"a": {"n": 1}}})
    run = Run.start(uuid.uuid4(), data)
    log = chain(run)
    run.mark_step_ready(ready("a"))
    run.mark_step_ready(ready("b"))
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=0, output={"n": 1}))  # no job for a reused output
    refused(lambda: run.succeed_step(ev.StepSucceeded(step_id="b", attempt=0)), "attempt 0 is not running")
    refused(lambda: run.succeed_step(ev.StepSucceeded(step_id="a", attempt=0)), "attempt 0 is not running")
    assert run.steps["a"].status == "succeeded" and run.rerun_of == "r-0"
    assert_replays(run, chain(run, log))


def test_skipped() -> None:
    run = new_run()
    run.skip_step(ev.StepSkipped(step_id="b", reason="condition false"))
    assert run.steps["b"].status == "skipped" and run.steps["b"].terminal
    refused(lambda: run.skip_step(ev.StepSkipped(step_id="b", reason="again")), "step is skipped")
    refused(lambda: run.mark_step_ready(ready("b")), "already ready")
    running(run, "a")
    refused(lambda: run.skip_step(ev.StepSkipped(step_id="a", reason="late")), "step is dispatched")
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=1))
    run.succeed(ev.RunSucceeded())
    assert run.status == "succeeded"


# -- compensation, cancel, ended runs --------------------------------------------------------
def test_compensation() -> None:
    run = new_run()
    log = chain(run)
    running(run, "a")
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=1, output="made"))
    running(run, "b")
    run.fail_step(failed("b", 1, final=True))
    run.start_compensation(ev.CompensationStarted(failed_step="b", steps=["undo-a"]))
    assert run.status == "compensating" and run.compensation is not None
    assert run.compensation.steps == ["undo-a"] and not run.compensation.finished
    refused(lambda: run.start_compensation(ev.CompensationStarted(failed_step="b", steps=[])), "run is compensating")
    refused(lambda: run.mark_step_ready(ready("c")), "run is compensating")
    refused(lambda: run.skip_step(ev.StepSkipped(step_id="c", reason="x")), "run is compensating")
    refused(lambda: run.succeed(ev.RunSucceeded()), "run is compensating")
    run.mark_step_ready(ready("undo-a", compensation_of="a"))
    run.decide_policy(decided("undo-a"))
    run.dispatch_step(dispatched("undo-a"))
    run.record_heartbeat(ev.StepHeartbeat(step_id="undo-a", attempt=1))
    run.succeed_step(ev.StepSucceeded(step_id="undo-a", attempt=1))
    assert run.steps["undo-a"].compensation_of == "a"
    run.finish_compensation(ev.CompensationFinished(ok=True))
    assert run.compensation.finished and run.compensation.ok and run.status == "compensating"
    run.fail(ev.RunFailed(reason="b failed", step_id="b", compensated=True))
    assert run.status == "failed"
    refused(lambda: run.finish_compensation(ev.CompensationFinished(ok=True)), "run is failed")
    assert_replays(run, chain(run, log))


def test_finish_compensation_needs_compensation() -> None:
    run = new_run()
    refused(lambda: run.finish_compensation(ev.CompensationFinished(ok=True)), "run is running")


def test_cancel_cancels_unfinished_steps() -> None:
    run = new_run()
    log = chain(run)
    running(run, "a")
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=1))
    running(run, "b")
    run.mark_step_ready(ready("c"))
    run.cancel(ev.RunCancelled(by="ann", reason="changed my mind"))
    assert run.status == "cancelled" and run.reason == "changed my mind"
    assert {k: s.status for k, s in run.steps.items()} == {"a": "succeeded", "b": "cancelled", "c": "cancelled"}
    refused(lambda: run.cancel(ev.RunCancelled()), "already cancelled")
    refused(lambda: run.record_heartbeat(ev.StepHeartbeat(step_id="b", attempt=1)), "run is cancelled")
    assert_replays(run, chain(run, log))


@pytest.mark.parametrize("end", ["succeed", "fail", "deny", "cancel", "time_out"])
def test_illegal_transitions_after_the_run_ended(end: str) -> None:
    run = new_run()
    running(run, "a")
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=1))
    running(run, "b")
    if end == "succeed":
        run.succeed_step(ev.StepSucceeded(step_id="b", attempt=1))
    {
        "succeed": lambda: run.succeed(ev.RunSucceeded()),
        "fail": lambda: run.fail(ev.RunFailed(reason="x")),
        "deny": lambda: run.deny(ev.RunDenied(step_id=None, reason="x")),
        "cancel": lambda: run.cancel(ev.RunCancelled()),
        "time_out": lambda: run.time_out(ev.RunTimedOut(timeout_ms=1)),
    }[end]()
    assert run.terminal
    run.collect_events()
    version = run.version
    now = datetime.now(UTC)
    attempts: list[Callable[[], None]] = [
        lambda: run.mark_step_ready(ready("c")),
        lambda: run.mark_step_ready(ready("c", compensation_of="a")),
        lambda: run.expand_step(ev.StepExpanded(step_id="c", count=1)),
        lambda: run.skip_step(ev.StepSkipped(step_id="c", reason="x")),
        lambda: run.decide_policy(decided("b")),
        lambda: run.request_approval(requested("b")),
        lambda: run.grant_approval(ev.ApprovalGranted(step_id="b", job_hash=jh("b"), approver="a", role="lead"),
                                   now=now),
        lambda: run.reject_approval(ev.ApprovalRejected(step_id="b", job_hash=jh("b"), approver="a", role="lead")),
        lambda: run.expire_approval(ev.ApprovalExpired(step_id="b", job_hash=jh("b"))),
        lambda: run.dispatch_step(dispatched("b", 2)),
        lambda: run.record_heartbeat(ev.StepHeartbeat(step_id="b", attempt=1)),
        lambda: run.succeed_step(ev.StepSucceeded(step_id="b", attempt=1)),
        lambda: run.fail_step(failed("b", 1)),
        lambda: run.schedule_retry(retry("b", 2)),
        lambda: run.time_out_step(ev.StepTimedOut(step_id="b", attempt=1)),
        lambda: run.start_compensation(ev.CompensationStarted(failed_step="b", steps=[])),
        lambda: run.finish_compensation(ev.CompensationFinished(ok=True)),
        lambda: run.succeed(ev.RunSucceeded()),
        lambda: run.fail(ev.RunFailed(reason="x")),
        lambda: run.deny(ev.RunDenied(step_id=None, reason="x")),
        lambda: run.cancel(ev.RunCancelled()),
        lambda: run.time_out(ev.RunTimedOut(timeout_ms=1)),
    ]
    for action in attempts:
        refused(action)
    assert run.version == version and run.collect_events() == []
    # evidence of a stale attempt is still kept after the end
    run.record_late_result(ev.LateResultRecorded(step_id="a", attempt=1, ok=True))
    assert run.version == version + 1


# -- property-based: random valid and invalid command sequences --------------------------------
STEPS = ("a", "b", "c", "d")
REUSED = {"d": {"n": 0}}  # the machine's runs re-run a run and may reuse step d's output
ACTIVE = frozenset({"dispatched", "running", "timed_out"})
PROGRESS = frozenset({"ready", "ready_comp", "decide", "request", "grant", "dispatch", "heartbeat", "succeed_step",
                      "retry", "timeout_step"})
RUN_ENDERS = ("succeed", "fail", "deny", "cancel", "time_out")
STEP_COMMANDS = ("ready", "skip", "decide", "request", "grant", "reject", "expire", "dispatch", "heartbeat",
                 "succeed_step", "fail_step", "retry", "timeout_step", "late", "ready_comp", "start_comp",
                 "finish_comp")


@dataclasses.dataclass(frozen=True)
class Cmd:
    name: str
    step: str = "a"
    attempt: int = 1
    right_hash: bool = True
    role: str = "lead"
    decision: ev.Decision = "allow"
    final: bool = False
    expired: bool = False


@dataclasses.dataclass
class MStep:
    """The test's own model of a step."""

    status: str
    attempt: int = 0
    pending: bool = False
    expires_at: datetime | None = None


class Model:
    """What the run should be, written down independently of run.py: the rules as a spec."""

    def __init__(self) -> None:
        self.status = "running"
        self.steps: dict[str, MStep] = {}

    def live(self) -> bool:
        return self.status in ("running", "compensating")

    def legal(self, c: Cmd) -> bool:
        s = self.steps.get(c.step)
        live = self.live()
        if c.name == "ready":
            return self.status == "running" and s is None
        if c.name == "ready_comp":
            return live and s is None
        if c.name == "skip":
            return self.status == "running" and s is None
        if c.name in RUN_ENDERS:
            if c.name == "succeed":
                return self.status == "running" and all(m.status in TERMINAL_STEP for m in self.steps.values())
            if c.name in ("cancel", "time_out"):
                return self.status not in TERMINAL_RUN
            return live
        if c.name == "start_comp":
            return self.status == "running"
        if c.name == "finish_comp":
            return self.status == "compensating"
        if s is None:
            return False
        if c.name == "late":
            return c.attempt < s.attempt or (c.attempt == s.attempt and (s.status not in ACTIVE or not live))
        if not live:
            return False
        if c.name == "decide":
            return s.status == "ready" and c.right_hash
        if c.name == "request":
            return s.status == "awaiting_approval" and not s.pending and c.right_hash
        if c.name in ("grant", "reject", "expire"):
            ok = s.status == "awaiting_approval" and s.pending and c.right_hash
            if c.name in ("grant", "reject"):
                ok = ok and c.role == "lead"
            if c.name == "grant":
                ok = ok and not c.expired
            return ok
        if c.name == "dispatch":
            return s.status in ("released", "retry_wait") and c.attempt == s.attempt + 1
        if c.name in ("heartbeat", "timeout_step"):
            return s.status in ("dispatched", "running") and c.attempt == s.attempt
        if c.name == "succeed_step":
            if s.status == "ready" and c.step in REUSED:  # output reused from the run re-run
                return True
            return s.status in ACTIVE and c.attempt == s.attempt
        if c.name == "fail_step":
            return s.status not in TERMINAL_STEP and (s.status not in ACTIVE or c.attempt == s.attempt)
        if c.name == "retry":
            return s.status in ACTIVE and c.attempt == s.attempt + 1
        raise AssertionError(c.name)

    def apply(self, c: Cmd, expires_at: datetime | None) -> None:
        s = self.steps.get(c.step)
        if c.name in ("ready", "ready_comp"):
            self.steps[c.step] = MStep("ready")
        elif c.name == "skip":
            self.steps[c.step] = MStep("skipped")
        elif c.name == "start_comp":
            self.status = "compensating"
        elif c.name == "finish_comp" or c.name == "late":
            pass
        elif c.name in RUN_ENDERS:
            self.status = {"succeed": "succeeded", "fail": "failed", "deny": "denied", "cancel": "cancelled",
                           "time_out": "timed_out"}[c.name]
            if c.name == "cancel":
                for m in self.steps.values():
                    if m.status not in TERMINAL_STEP:
                        m.status = "cancelled"
        else:
            assert s is not None
            if c.name == "decide":
                s.status = {"deny": "denied", "require_approval": "awaiting_approval",
                            "allow": "released"}[c.decision]
            elif c.name == "request":
                s.pending, s.expires_at = True, expires_at
            elif c.name == "grant":
                s.pending, s.status = False, "released"
            elif c.name in ("reject", "expire"):
                s.pending = False
            elif c.name == "dispatch":
                s.status, s.attempt = "dispatched", c.attempt
            elif c.name == "heartbeat":
                s.status = "running"
            elif c.name == "succeed_step":
                s.status = "succeeded"
            elif c.name == "fail_step":
                s.status = "failed" if c.final else s.status
            elif c.name == "retry":
                s.status = "retry_wait"
            elif c.name == "timeout_step":
                s.status = "timed_out"

    def step_candidates(self) -> dict[str, list[Cmd]]:
        """Legal commands on each step, by step."""
        out: dict[str, list[Cmd]] = {}
        for step in STEPS:
            s = self.steps.get(step)
            attempt = s.attempt if s else 0
            skip = "ready_comp" if self.status == "running" else "ready"  # one way to make a step ready
            names = [n for n in STEP_COMMANDS[:-2] if n != skip]
            options = [v for name in names for v in _variants(name, step, attempt) if self.legal(v)]
            # commands that move a step on come twice: deeper runs in the same number of steps
            options += [c for c in options if c.name in PROGRESS]
            if options:
                out[step] = options
        return out

    def run_candidates(self) -> list[Cmd]:
        """Legal run-level commands: compensation, then the ones that end the run."""
        return [Cmd(name) for name in ("start_comp", "finish_comp", *RUN_ENDERS) if self.legal(Cmd(name))]


def _variants(name: str, step: str, attempt: int) -> list[Cmd]:
    if name == "decide":
        return [Cmd(name, step, decision=d) for d in ("allow", "require_approval", "deny")]
    if name == "fail_step":
        return [Cmd(name, step, attempt=attempt, final=f) for f in (False, True)]
    if name in ("dispatch", "retry"):
        return [Cmd(name, step, attempt=attempt + 1)]
    if name == "late":
        return [Cmd(name, step, attempt=max(attempt - 1, 1))]
    return [Cmd(name, step, attempt=attempt)]


def build(run: Run, c: Cmd, now: datetime) -> Callable[[], None]:
    """The aggregate call for a command (may raise ValidationError for data out of contract)."""
    h = jh(c.step) if c.right_hash else WRONG_HASH
    n = c.name
    if n == "ready":
        data: Any = ready(c.step)
        return lambda: run.mark_step_ready(data)
    if n == "ready_comp":
        data = ready(c.step, compensation_of="a")
        return lambda: run.mark_step_ready(data)
    if n == "skip":
        data = ev.StepSkipped(step_id=c.step, reason="condition false")
        return lambda: run.skip_step(data)
    if n == "decide":
        data = decided(c.step, c.decision, h)
        return lambda: run.decide_policy(data)
    if n == "request":
        data = requested(c.step, now + timedelta(hours=1), h)
        return lambda: run.request_approval(data)
    if n == "grant":
        data = ev.ApprovalGranted(step_id=c.step, job_hash=h, approver="ann", role=c.role)
        at = now + timedelta(hours=2) if c.expired else now
        return lambda: run.grant_approval(data, now=at)
    if n == "reject":
        data = ev.ApprovalRejected(step_id=c.step, job_hash=h, approver="ann", role=c.role)
        return lambda: run.reject_approval(data)
    if n == "expire":
        data = ev.ApprovalExpired(step_id=c.step, job_hash=h)
        return lambda: run.expire_approval(data)
    if n == "dispatch":
        data = dispatched(c.step, c.attempt)
        return lambda: run.dispatch_step(data)
    if n == "heartbeat":
        data = ev.StepHeartbeat(step_id=c.step, attempt=c.attempt, worker="w")
        return lambda: run.record_heartbeat(data)
    if n == "succeed_step":
        data = ev.StepSucceeded(step_id=c.step, attempt=c.attempt, output={"n": c.attempt})
        return lambda: run.succeed_step(data)
    if n == "fail_step":
        data = failed(c.step, c.attempt, c.final)
        return lambda: run.fail_step(data)
    if n == "retry":
        data = retry(c.step, c.attempt)
        return lambda: run.schedule_retry(data)
    if n == "timeout_step":
        data = ev.StepTimedOut(step_id=c.step, attempt=c.attempt)
        return lambda: run.time_out_step(data)
    if n == "late":
        data = ev.LateResultRecorded(step_id=c.step, attempt=c.attempt, ok=True)
        return lambda: run.record_late_result(data)
    if n == "start_comp":
        data = ev.CompensationStarted(failed_step=c.step, steps=[c.step])
        return lambda: run.start_compensation(data)
    if n == "finish_comp":
        data = ev.CompensationFinished(ok=True)
        return lambda: run.finish_compensation(data)
    if n == "succeed":
        return lambda: run.succeed(ev.RunSucceeded(output="all done"))
    if n == "fail":
        return lambda: run.fail(ev.RunFailed(reason="gave up"))
    if n == "deny":
        return lambda: run.deny(ev.RunDenied(step_id=None, reason="no"))
    if n == "cancel":
        return lambda: run.cancel(ev.RunCancelled(by="ann"))
    if n == "time_out":
        return lambda: run.time_out(ev.RunTimedOut(timeout_ms=1000))
    raise AssertionError(n)


any_command = st.builds(
    Cmd,
    name=st.sampled_from(STEP_COMMANDS + RUN_ENDERS),
    step=st.sampled_from((*STEPS, "zz")),
    attempt=st.integers(0, 4),
    right_hash=st.booleans(),
    role=st.sampled_from(("lead", "intern")),
    decision=st.sampled_from(("allow", "require_approval", "deny")),
    final=st.booleans(),
    expired=st.booleans(),
)


class RunMachine(RuleBasedStateMachine):
    """Valid commands must be accepted and change the run as the model says; invalid ones must be
    refused without a trace. At the end the collected log replays to the same state and verifies."""

    def __init__(self) -> None:
        super().__init__()
        self.run = Run.start(uuid.uuid4(), started().model_copy(update={"rerun_of": "r-0", "reused_outputs": REUSED}))
        self.model = Model()
        self.log = chain(self.run)
        self.min_events = 1

    @initialize(min_events=st.integers(3, 50))
    def setup(self, min_events: int) -> None:
        self.min_events = min_events

    def _do(self, c: Cmd) -> None:
        now = datetime.now(UTC)
        call = build(self.run, c, now)
        version = self.run.version
        call()
        event(f"applied {c.name}")
        self.model.apply(c, now + timedelta(hours=1))
        assert self.run.version == version + 1
        chain(self.run, self.log)

    # no preconditions: a rule with nothing legal to do is a no-op (filtered rules make
    # hypothesis give up on examples)
    @rule(data=st.data())
    def valid_step_command(self, data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 4))):
            by_step = self.model.step_candidates()
            if not by_step:
                return
            step = data.draw(st.sampled_from(sorted(by_step)))
            self._do(data.draw(st.sampled_from(by_step[step])))

    @rule(step=st.sampled_from(STEPS), decision=st.sampled_from(("allow", "require_approval")),
          depth=st.integers(1, 4))
    def drive_new_step(self, step: str, decision: ev.Decision, depth: int) -> None:
        """A shortcut to deeper states: make a step ready and move it on by up to ``depth`` commands."""
        ready_cmd = "ready" if self.model.status == "running" else "ready_comp"
        path = [Cmd(ready_cmd, step), Cmd("decide", step, decision=decision),
                Cmd("request" if decision == "require_approval" else "dispatch", step, attempt=1),
                Cmd("grant" if decision == "require_approval" else "heartbeat", step, attempt=1)]
        for c in path[:depth]:
            if not self.model.legal(c):
                return
            self._do(c)

    @rule(data=st.data())
    def valid_run_command(self, data: st.DataObject) -> None:
        options = self.model.run_candidates()
        if self.run.version < self.min_events:  # let the run grow before it may end
            options = [c for c in options if c.name not in (*RUN_ENDERS, "start_comp")]
        if options:
            self._do(data.draw(st.sampled_from(options)))

    @rule(data=st.data())
    def random_command(self, data: st.DataObject) -> None:
        c = data.draw(any_command)
        if bool(self.model.steps) and data.draw(st.booleans()):  # aim close to legal: a known step, a near attempt
            step = data.draw(st.sampled_from(sorted(self.model.steps)))
            near = self.model.steps[step].attempt
            c = dataclasses.replace(c, step=step, attempt=data.draw(st.sampled_from((near, near + 1, near - 1))))
        try:
            call = build(self.run, c, datetime.now(UTC))
        except ValidationError:
            return  # not even a well-formed command (e.g. attempt 0 for a dispatch)
        if self.model.legal(c):
            self._do(c)
            return
        version = self.run.version
        with pytest.raises(IllegalTransition):
            call()
        assert self.run.version == version
        assert self.run.collect_events() == []
        event(f"refused {c.name}")

    @rule(data=st.data())
    def sweep_invalid_commands(self, data: st.DataObject) -> None:
        """Every command name against one step and attempt: each one the rules forbid is refused."""
        template = data.draw(any_command)
        if bool(self.model.steps) and data.draw(st.booleans()):
            step = data.draw(st.sampled_from(sorted(self.model.steps)))
            near = self.model.steps[step].attempt
            template = dataclasses.replace(template, step=step,
                                           attempt=data.draw(st.sampled_from((near, near + 1, near - 1))))
        for name in STEP_COMMANDS + RUN_ENDERS:
            c = dataclasses.replace(template, name=name)
            if self.model.legal(c):
                continue
            try:
                call = build(self.run, c, datetime.now(UTC))
            except ValidationError:
                continue
            version = self.run.version
            with pytest.raises(IllegalTransition):
                call()
            assert self.run.version == version and self.run.collect_events() == []

    @invariant()
    def matches_model(self) -> None:
        assert self.run.status == self.model.status
        assert {k: (s.status, s.attempt) for k, s in self.run.steps.items()} == {
            k: (m.status, m.attempt) for k, m in self.model.steps.items()}
        for k, m in self.model.steps.items():
            approval = self.run.steps[k].approval
            assert m.pending == (approval is not None and approval.status == "requested")

    def teardown(self) -> None:
        # (a) replaying the stored form gives the same state
        assert state(replay(self.log)) == state(self.run)
        # (b) the chain built along the way verifies
        report = verify_envelopes(self.log)
        assert report.ok, report.problems
        assert report.events == self.run.version == len(self.log)
        assert report.head_hash == self.log[-1]["hash"]


TestRunMachine = RunMachine.TestCase
TestRunMachine.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@settings(max_examples=80, deadline=None)
@given(walk=st.lists(st.integers(0, 10_000), max_size=40), commands=st.lists(any_command, min_size=1, max_size=15))
def test_random_invalid_commands_are_refused_without_a_trace(walk: list[int], commands: list[Cmd]) -> None:
    """Walk to a random reachable state by valid commands, then throw random commands at it: each
    one the rules forbid raises IllegalTransition and leaves version and pending events alone."""
    run = Run.start(uuid.uuid4(), started().model_copy(update={"reused_outputs": REUSED}))
    model = Model()
    run.collect_events()
    for pick in walk:
        options = [c for cs in model.step_candidates().values() for c in cs] + model.run_candidates()
        if not options:
            break
        c = options[pick % len(options)]
        now = datetime.now(UTC)
        build(run, c, now)()
        model.apply(c, now + timedelta(hours=1))
    run.collect_events()
    for c in commands:
        if model.legal(c):
            continue
        try:
            call = build(run, c, datetime.now(UTC))
        except ValidationError:
            continue
        version = run.version
        with pytest.raises(IllegalTransition):
            call()
        assert run.version == version and run.collect_events() == []
