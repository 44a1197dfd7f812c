"""The dispatcher's rules without NATS: dispatch, retries, timeouts, leases, late results, notices."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import CancelNotice, Heartbeat, JobError, JobResult, Notification, TimerFired
from interlock.core.eventstore import StaleState
from interlock.core.run import Run
from interlock.core.workflow import Workflow
from interlock.dispatcher import rules
from interlock.dispatcher.rules import PublishJob
from tests.unit.run_builders import advance, decide, started_run, types, workflow

RETRIES = {"max_attempts": 3, "backoff_ms": 1000, "multiplier": 2.0, "jitter": 0.5, "max_backoff_ms": 60_000}


def released(wf: Workflow, run_input: Any = None, **decision: Any) -> Run:
    run = started_run(wf, run_input)
    for sid, state in run.steps.items():
        if state.status == "ready":
            decide(run, sid, **decision)
    run.collect_events()
    return run


def dispatched(wf: Workflow, now: datetime, **decision: Any) -> Run:
    run = released(wf, **decision)
    rules.dispatch(run, wf, now)
    run.collect_events()
    return run


def result(run: Run, step_id: str = "a", attempt: int = 1, ok: bool = True, output: Any = None,
           error: JobError | None = None) -> JobResult:
    return JobResult(job_id=f"{run.run_id}:{step_id}@{attempt}", run_id=run.run_id, tenant=run.tenant,
                     step_id=step_id, attempt=attempt, ok=ok, output=output, error=error, worker="w1")


def timer(run: Run, kind: Any, due_at: datetime, step_id: str = "a", attempt: int = 1) -> TimerFired:
    return TimerFired(kind=kind, run_id=run.run_id, tenant=run.tenant, step_id=step_id, attempt=attempt,
                      due_at=due_at)


def beat(run: Run, step_id: str = "a", attempt: int = 1) -> Heartbeat:
    return Heartbeat(job_id=f"{run.run_id}:{step_id}@{attempt}", run_id=run.run_id, tenant=run.tenant,
                     step_id=step_id, attempt=attempt, worker="w1", progress="half")


def now() -> datetime:
    return datetime.now(UTC)


# -- dispatching -----------------------------------------------------------------------------
def test_released_job_is_dispatched_with_its_deadline_timer() -> None:
    wf = workflow(a={"topic": "t.a", "input": {"x": "{{ input.x }}"}, "timeout_ms": 2000,
                     "heartbeat_timeout_ms": 900})
    run = released(wf, {"x": 7}, constraints={"region": "eu"})
    t0 = now()
    effects = rules.dispatch(run, wf, t0)
    assert types(run) == [ev.StepDispatched.type_name]
    state = run.steps["a"]
    assert (state.status, state.attempt, state.job_id) == ("dispatched", 1, f"{run.run_id}:a@1")
    assert state.deadline == t0 + timedelta(milliseconds=2000)
    [effect] = effects
    assert isinstance(effect, PublishJob)
    job = effect.job
    assert (job.job_id, job.topic, job.attempt, job.input, job.deadline) == (state.job_id, "t.a", 1, {"x": 7},
                                                                           state.deadline)
    assert job.idempotency_key == f"{run.run_id}:a" and job.constraints == {"region": "eu"}
    assert job.heartbeat_interval_ms == 300 and job.job_hash == state.job_hash
    assert job.trace_parent is not None and job.trace_parent.startswith(f"00-{run.id.hex}-")
    assert effect.deadline == timer(run, "deadline", state.deadline)


def test_default_deadline_gets_no_timer_and_heartbeat_interval_has_a_floor() -> None:
    wf = workflow(a={"topic": "t.a", "heartbeat_timeout_ms": 150})
    run = released(wf)
    t0 = now()
    [effect] = rules.dispatch(run, wf, t0)
    assert isinstance(effect, PublishJob) and effect.deadline is None
    assert run.steps["a"].deadline == t0 + timedelta(milliseconds=rules.DEFAULT_TIMEOUT_MS)
    assert effect.job.heartbeat_interval_ms == 100


def test_nothing_is_dispatched_before_policy_or_after_the_run_ended() -> None:
    wf = workflow(a={"topic": "t.a"})
    run = started_run(wf)
    run.collect_events()
    assert rules.dispatch(run, wf, now()) == [] and types(run) == []  # ready, not released
    decide(run, "a")
    run.cancel(ev.RunCancelled(by="ann", reason="stop"))
    run.collect_events()
    assert rules.dispatch(run, wf, now()) == [] and types(run) == []


def test_a_retry_is_dispatched_once_due_within_the_tolerance() -> None:
    wf = workflow(a={"topic": "t.a", "retries": RETRIES})
    t0 = now()
    run = dispatched(wf, t0)
    rules.record_result(run, wf, result(run, ok=False, error=JobError(message="flaky")), None, t0, 0.5)
    due = run.steps["a"].retry_due_at
    assert due is not None and run.steps["a"].status == "retry_wait"
    run.collect_events()
    assert rules.dispatch(run, wf, due - timedelta(milliseconds=200)) == []
    [effect] = rules.dispatch(run, wf, due - timedelta(milliseconds=40))  # 40 ms early counts as due
    assert isinstance(effect, PublishJob) and effect.job.attempt == 2
    assert effect.job.job_id == f"{run.run_id}:a@2" and run.steps["a"].status == "dispatched"


def test_notify_step_sends_its_message_and_succeeds() -> None:
    wf = workflow(a={"topic": "t.a"},
                  tell={"type": "notify", "depends_on": "a", "channel": "ops",
                        "message": "a said {{ steps.a.output.word }}", "input": {"n": 1}})
    run = released(wf)
    rules.dispatch(run, wf, now())
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=1, output={"word": "hi"}))
    run.collect_events()
    advance(run, wf)
    decide(run, "tell")
    run.collect_events()
    [note] = rules.dispatch(run, wf, now())
    assert note == Notification(run_id=run.run_id, tenant=run.tenant, workflow_id="wf", step_id="tell",
                                channel="ops", message="a said hi", data={"n": 1})
    assert types(run) == [ev.StepSucceeded.type_name]
    assert run.steps["tell"].output == {"subject": s.notify(run.tenant, "ops"), "message": "a said hi"}


def test_notify_step_without_message_sends_a_run_summary() -> None:
    wf = workflow(a={"topic": "t.a"}, b={"topic": "t.b"}, tell={"type": "notify", "depends_on": "a"})
    run = released(wf)
    rules.dispatch(run, wf, now())
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=1, output={}))
    run.collect_events()
    advance(run, wf)
    decide(run, "tell")
    run.collect_events()
    [note] = rules.dispatch(run, wf, now())
    assert isinstance(note, Notification)
    assert note.message == f"workflow wf run {run.run_id}: a=succeeded, b={run.steps['b'].status}"


def test_cancel_notice_only_for_an_early_end() -> None:
    cancelled = {"type": ev.RunCancelled.type_name, "data": {"by": "ann", "reason": "enough"}}
    timed_out = {"type": ev.RunTimedOut.type_name, "data": {"timeout_ms": 5}}
    done = {"type": ev.RunSucceeded.type_name, "data": {}}
    assert rules.cancel_notice("t", "r", [cancelled]) == CancelNotice(run_id="r", tenant="t", reason="enough")
    assert rules.cancel_notice("t", "r", [timed_out]) == CancelNotice(run_id="r", tenant="t", reason="")
    assert rules.cancel_notice("t", "r", [done]) is None


def test_republish_and_lost_jobs_skip_what_this_process_published() -> None:
    wf = workflow(a={"topic": "t.a"})
    run = dispatched(wf, now())
    job = run.steps["a"].job_id
    assert job is not None
    envelope = {"type": ev.StepDispatched.type_name, "step_id": "a", "data": {"job_id": job}}
    assert [p.job.job_id for p in rules.republish(run, wf, [envelope], set())] == [job]
    assert rules.republish(run, wf, [envelope], {job}) == []
    assert [p.job.job_id for p in rules.lost_jobs(run, wf, set())] == [job]
    assert rules.lost_jobs(run, wf, {job}) == []
    # the commit that released the job (redelivered after a crash) re-offers it too
    decided = {"type": ev.PolicyDecided.type_name, "step_id": "a", "data": {}}
    assert [p.job.job_id for p in rules.republish(run, wf, [decided], set())] == [job]
    # a commit about other steps re-offers nothing; nor one once a worker started the job
    assert rules.republish(run, wf, [{"type": ev.PolicyDecided.type_name, "step_id": "b", "data": {}}], set()) == []
    run.steps["a"].status = "running"
    assert rules.republish(run, wf, [envelope], set()) == []


def test_a_retry_commit_brings_back_its_timer_while_the_retry_waits() -> None:
    # a dispatcher killed between the RetryScheduled commit and scheduling its timer: the commit's
    # (re)delivery schedules the same timer again (same due time: a duplicate when it was not lost)
    wf = workflow(a={"topic": "t.a", "retries": RETRIES})
    t0 = now()
    run = dispatched(wf, t0)
    [scheduled] = rules.record_result(run, wf, result(run, ok=False, error=JobError(message="flaky")), None, t0, 0.3)
    assert isinstance(scheduled, TimerFired)
    assert types(run) == [ev.StepFailed.type_name, ev.RetryScheduled.type_name]
    data = ev.RetryScheduled(step_id="a", attempt=2, due_at=scheduled.due_at, delay_ms=1).model_dump(mode="json")
    envelopes = [{"type": ev.StepFailed.type_name, "step_id": "a", "data": {}},
                 {"type": ev.RetryScheduled.type_name, "step_id": "a", "data": data}]
    assert rules.retry_timers(run, envelopes) == [scheduled]
    rules.dispatch(run, wf, scheduled.due_at)  # the retry went out: nothing left to bring back
    assert run.steps["a"].status == "dispatched"
    assert rules.retry_timers(run, envelopes) == []


def test_a_retry_timer_ahead_of_a_stale_run_asks_for_the_log_not_a_no_op() -> None:
    # a copy of the dispatcher whose cached run missed the RetryScheduled another copy appended
    wf = workflow(a={"topic": "t.a", "retries": RETRIES})
    t0 = now()
    stale = dispatched(wf, t0)
    fired = timer(stale, "retry", t0, attempt=2)
    with pytest.raises(StaleState):
        rules.retry_due(stale, wf, fired, t0)
    # the run as the log has it: the due retry is dispatched
    run = dispatched(wf, t0)
    [scheduled] = rules.record_result(run, wf, result(run, ok=False, error=JobError(message="flaky")), None, t0, 0.3)
    assert isinstance(scheduled, TimerFired)
    run.collect_events()
    [job] = rules.retry_due(run, wf, scheduled, scheduled.due_at)
    assert isinstance(job, PublishJob) and job.job.attempt == 2
    assert rules.retry_due(run, wf, scheduled, scheduled.due_at) == []  # fired twice: nothing more to do


# -- results ---------------------------------------------------------------------------------
def test_success_records_the_output() -> None:
    wf = workflow(a={"topic": "t.a", "output_schema": {"type": "object", "required": ["ok"]}})
    run = dispatched(wf, now())
    assert rules.record_result(run, wf, result(run, output={"ok": 1}), {"ok": 1}, now(), 0.1) == []
    assert types(run) == [ev.StepSucceeded.type_name]
    assert run.steps["a"].output == {"ok": 1}


def test_output_schema_failure_is_final_even_with_retries_left() -> None:
    wf = workflow(a={"topic": "t.a", "retries": RETRIES, "output_schema": {"type": "object", "required": ["ok"]}})
    run = dispatched(wf, now())
    # the schema is checked on the resolved output the service passes, not on the inline field
    effects = rules.record_result(run, wf, result(run, output=None), {"nope": 1}, now(), 0.1)
    assert effects == [] and types(run) == [ev.StepFailed.type_name]
    error = run.steps["a"].error
    assert run.steps["a"].status == "failed" and error is not None
    assert (error.kind, error.retryable) == ("output_schema", False)
    assert error.message.startswith("output does not match output_schema: at (root): 'ok' is a required property")


def test_retryable_failure_schedules_a_retry_with_backoff_and_jitter() -> None:
    wf = workflow(a={"topic": "t.a", "retries": RETRIES})
    policy = wf.steps["a"].retries
    delays = []
    for jitter in (0.0, 0.75):
        t0 = now()
        run = dispatched(wf, t0)
        [retry] = rules.record_result(run, wf, result(run, ok=False, error=JobError(message="flaky")), None, t0,
                                      jitter)
        assert types(run) == [ev.StepFailed.type_name, ev.RetryScheduled.type_name]
        delay = policy.delay_ms(1, jitter)
        assert retry == timer(run, "retry", t0 + timedelta(milliseconds=delay), attempt=2)
        assert run.steps["a"].retry_due_at == retry.due_at and run.steps["a"].error is not None
        delays.append(delay)
    assert delays == [500, 1250]  # 1000 ms * (1 - 0.5 + 2 * 0.5 * jitter)


def test_the_last_attempt_fails_finally_and_says_how_many() -> None:
    wf = workflow(a={"topic": "t.a", "retries": {**RETRIES, "max_attempts": 2}})
    t0 = now()
    run = dispatched(wf, t0)
    error = JobError(message="flaky")
    rules.record_result(run, wf, result(run, ok=False, error=error), None, t0, 0.5)
    rules.dispatch(run, wf, t0 + timedelta(minutes=1))
    run.collect_events()
    assert rules.record_result(run, wf, result(run, attempt=2, ok=False, error=error), None, t0, 0.5) == []
    assert types(run) == [ev.StepFailed.type_name]
    state = run.steps["a"]
    assert state.status == "failed" and state.error is not None
    assert state.error.message == "flaky (after 2 attempts)"


def test_non_retryable_failure_and_failure_without_reason() -> None:
    wf = workflow(a={"topic": "t.a", "retries": RETRIES}, b={"topic": "t.b", "retries": RETRIES})
    run = dispatched(wf, now())
    rules.record_result(run, wf, result(run, ok=False, error=JobError(message="bad input", retryable=False)),
                        None, now(), 0.5)
    a_error = run.steps["a"].error
    assert run.steps["a"].status == "failed" and a_error is not None and a_error.message == "bad input"
    [retry] = rules.record_result(run, wf, result(run, "b", ok=False), None, now(), 0.5)
    b_error = run.steps["b"].error
    assert isinstance(retry, TimerFired) and retry.kind == "retry" and b_error is not None
    assert b_error.message == "the worker reported a failure without a reason"


def test_worker_timeout_at_the_deadline_is_recorded_as_a_timeout() -> None:
    wf = workflow(a={"topic": "t.a", "timeout_ms": 1000, "retries": RETRIES})
    t0 = now()
    run = dispatched(wf, t0)
    deadline = run.steps["a"].deadline
    assert deadline is not None
    timeout = JobError(message="gave up", kind="timeout")
    rules.record_result(run, wf, result(run, ok=False, error=timeout), None, deadline - timedelta(milliseconds=30), 0)
    assert types(run) == [ev.StepTimedOut.type_name, ev.StepFailed.type_name, ev.RetryScheduled.type_name]


def test_worker_timeout_well_before_the_deadline_is_an_ordinary_failure() -> None:
    wf = workflow(a={"topic": "t.a", "timeout_ms": 60_000, "retries": RETRIES})
    t0 = now()
    run = dispatched(wf, t0)
    timeout = JobError(message="my own timeout", kind="timeout")
    rules.record_result(run, wf, result(run, ok=False, error=timeout), None, t0 + timedelta(seconds=1), 0)
    assert types(run) == [ev.StepFailed.type_name, ev.RetryScheduled.type_name]


def test_late_duplicate_and_unknown_results() -> None:
    wf = workflow(a={"topic": "t.a", "retries": RETRIES})
    t0 = now()
    run = dispatched(wf, t0)
    rules.record_result(run, wf, result(run, ok=False, error=JobError(message="flaky")), None, t0, 0.5)
    rules.dispatch(run, wf, t0 + timedelta(minutes=1))
    run.collect_events()
    # attempt 1's second answer arrives while attempt 2 runs: evidence only
    assert rules.record_result(run, wf, result(run, output={"late": True}), None, t0, 0.5) == []
    assert types(run) == [ev.LateResultRecorded.type_name]
    assert run.steps["a"].status == "dispatched" and run.steps["a"].attempt == 2
    rules.record_result(run, wf, result(run, attempt=2, output=1), 1, t0, 0.5)
    run.collect_events()
    # the same result again (a redelivery): its outcome is already recorded
    assert rules.record_result(run, wf, result(run, attempt=2, output=1), 1, t0, 0.5) == []
    assert types(run) == []
    with pytest.raises(StaleState, match="attempt 3, which run"):
        rules.record_result(run, wf, result(run, attempt=3), None, t0, 0.5)
    with pytest.raises(StaleState):
        rules.record_result(run, wf, result(run, step_id="zz"), None, t0, 0.5)


def test_result_after_the_run_ended() -> None:
    wf = workflow(a={"topic": "t.a"}, b={"topic": "t.b"})
    run = dispatched(wf, now())
    rules.record_result(run, wf, result(run, "b", ok=False, error=JobError(message="no", retryable=False)), None,
                        now(), 0.5)
    run.fail(ev.RunFailed(reason="b failed", step_id="b"))
    run.collect_events()
    # the run failed while a was still out: its answer is evidence only
    assert rules.record_result(run, wf, result(run), None, now(), 0.5) == []
    assert types(run) == [ev.LateResultRecorded.type_name] and run.steps["a"].status == "dispatched"
    # a cancelled run cancelled its steps: the attempt's outcome is already recorded
    cancelled = dispatched(workflow(a={"topic": "t.a"}), now())
    cancelled.cancel(ev.RunCancelled(reason="stop"))
    cancelled.collect_events()
    assert rules.record_result(cancelled, wf, result(cancelled), None, now(), 0.5) == []
    assert types(cancelled) == []


# -- heartbeats and leases -------------------------------------------------------------------
def test_heartbeats_renew_the_lease_and_the_log_keeps_every_third_of_it() -> None:
    wf = workflow(a={"topic": "t.a", "heartbeat_timeout_ms": 9000})
    run = dispatched(wf, now())
    since = run.steps["a"].dispatched_at
    assert since is not None
    early = since + timedelta(seconds=1)
    [lease] = rules.record_heartbeat(run, wf, beat(run), early, first=True)
    assert lease == timer(run, "lease", early + timedelta(seconds=9)) and types(run) == []
    assert rules.record_heartbeat(run, wf, beat(run), early, first=False) == []  # lease already set
    later = since + timedelta(seconds=3)
    [lease] = rules.record_heartbeat(run, wf, beat(run), later, first=False)
    assert lease == timer(run, "lease", later + timedelta(seconds=9))
    assert types(run) == [ev.StepHeartbeat.type_name] and run.steps["a"].status == "running"


def test_heartbeat_for_an_ended_or_unknown_attempt() -> None:
    wf = workflow(a={"topic": "t.a"})
    run = dispatched(wf, now())
    with pytest.raises(StaleState, match="ahead of the run"):
        rules.record_heartbeat(run, wf, beat(run, attempt=2), now(), first=True)
    rules.record_result(run, wf, result(run), None, now(), 0.5)
    run.collect_events()
    assert rules.record_heartbeat(run, wf, beat(run), now(), first=True) == [] and types(run) == []


def test_a_lease_heard_from_since_is_followed_by_a_later_timer() -> None:
    wf = workflow(a={"topic": "t.a", "heartbeat_timeout_ms": 2000})
    run = dispatched(wf, now())
    since = run.steps["a"].dispatched_at
    assert since is not None
    fired_at = since + timedelta(seconds=2.5)
    heard = since + timedelta(seconds=1.5)  # a heartbeat the log did not keep, seen by this process
    [follow_up] = rules.timer_fired(run, wf, timer(run, "lease", since + timedelta(seconds=2)), fired_at,
                                    heartbeat_seen_at=heard, jitter=0.5)
    assert follow_up == timer(run, "lease", heard + timedelta(seconds=2)) and types(run) == []


def test_an_expired_lease_times_the_attempt_out() -> None:
    wf = workflow(a={"topic": "t.a", "heartbeat_timeout_ms": 2000, "retries": RETRIES})
    run = dispatched(wf, now())
    since = run.steps["a"].dispatched_at
    assert since is not None
    fired_at = since + timedelta(seconds=2.5)
    [retry] = rules.timer_fired(run, wf, timer(run, "lease", since + timedelta(seconds=2)), fired_at,
                                heartbeat_seen_at=None, jitter=0.0)
    assert types(run) == [ev.StepTimedOut.type_name, ev.StepFailed.type_name, ev.RetryScheduled.type_name]
    error = run.steps["a"].error
    assert error is not None and error.kind == "timeout" and error.message.startswith("no heartbeat for 2s")
    assert retry == timer(run, "retry", fired_at + timedelta(milliseconds=500), attempt=2)


def test_deadline_timer_acts_only_once_the_deadline_passed() -> None:
    wf = workflow(a={"topic": "t.a", "timeout_ms": 1000})
    run = dispatched(wf, now())
    deadline = run.steps["a"].deadline
    assert deadline is not None
    fire = timer(run, "deadline", deadline)
    assert rules.timer_fired(run, wf, fire, deadline - timedelta(milliseconds=200), heartbeat_seen_at=None,
                             jitter=0) == []
    assert types(run) == []
    assert rules.timer_fired(run, wf, fire, deadline - timedelta(milliseconds=20), heartbeat_seen_at=None,
                             jitter=0) == []
    assert types(run) == [ev.StepTimedOut.type_name, ev.StepFailed.type_name]
    error = run.steps["a"].error
    assert run.steps["a"].status == "failed" and error is not None
    assert error.message == "attempt 1 exceeded its timeout"


def test_a_timer_for_an_attempt_that_ended_does_nothing() -> None:
    wf = workflow(a={"topic": "t.a", "timeout_ms": 1000})
    run = dispatched(wf, now())
    rules.record_result(run, wf, result(run), None, now(), 0.5)
    run.collect_events()
    for kind in ("deadline", "lease"):
        assert rules.timer_fired(run, wf, timer(run, kind, now()), now() + timedelta(hours=1),
                                 heartbeat_seen_at=None, jitter=0) == []
    assert types(run) == []
    with pytest.raises(StaleState):
        rules.timer_fired(run, wf, timer(run, "lease", now(), attempt=2), now(), heartbeat_seen_at=None, jitter=0)


def test_the_reconciler_finds_overdue_deadlines_and_silent_workers() -> None:
    wf = workflow(a={"topic": "t.a", "timeout_ms": 1000}, b={"topic": "t.b", "heartbeat_timeout_ms": 1000})
    run = dispatched(wf, now())
    deadline = run.steps["a"].deadline
    assert deadline is not None
    assert rules.overdue_timers(run, wf, deadline + timedelta(seconds=4), set()) == []  # within the grace
    late = deadline + timedelta(seconds=6)
    assert rules.overdue_timers(run, wf, late, set()) == [timer(run, "deadline", late)]
    rules.record_heartbeat(run, wf, beat(run, "b"), now() + timedelta(seconds=1), first=True)
    heard = run.steps["b"].last_heartbeat_at
    assert heard is not None and run.steps["b"].status == "running"
    quiet = heard + timedelta(seconds=6.5)  # quiet, but not yet for two leases and the grace
    assert timer(run, "lease", quiet, "b") not in rules.overdue_timers(run, wf, quiet, set())
    silent = heard + timedelta(seconds=7.5)
    b_job = run.steps["b"].job_id or ""
    assert timer(run, "lease", silent, "b") in rules.overdue_timers(run, wf, silent, set())
    assert timer(run, "lease", silent, "b") not in rules.overdue_timers(run, wf, silent, {b_job})
