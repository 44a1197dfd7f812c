"""The dispatcher's decisions, as pure functions of a run, its workflow, the time and what arrived.

Each rule calls commands on the :class:`Run` (the service appends the events they produce) and
returns the effects to carry out once those events are durable: jobs to publish, timers to
schedule, cancel notices to send. A :class:`~interlock.contracts.messages.Notification` is the
one effect sent *before* the commit that records its step's success (deduplicated by id), so a
crash between the two sends it once, not never.

Rules read nothing but their arguments: the clock (``now``) and the retry jitter are inputs, as
are the payloads the service resolved and the heartbeats it has seen, so a rule that runs again
after a conflict or a redelivery decides from the state it is given.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import (
    CancelNotice,
    Heartbeat,
    Job,
    JobError,
    JobResult,
    LlmCall,
    Notification,
    TimerFired,
)
from interlock.core import usage
from interlock.core.eventstore import StaleState
from interlock.core.ids import job_id
from interlock.core.run import ACTIVE_ATTEMPT, Run, StepState
from interlock.core.steps import base_step_id, is_workflow_step, output_schema_error, template_context
from interlock.core.workflow import Step, Workflow, render_text
from interlock.dispatcher import gate, guard
from interlock.dispatcher.routing import Decision, FailFast, Hold, Route
from interlock.runtime import tracing

DEFAULT_TIMEOUT_MS = 5 * 60 * 1000
DEFAULT_HEARTBEAT_TIMEOUT_MS = 15_000
RETRY_EARLY_TOLERANCE = timedelta(milliseconds=50)  # a timer firing this early counts as due
OVERDUE_GRACE = timedelta(seconds=5)  # the reconciler acts only when a timer is clearly late

RUN_ENDINGS = ev.kinds(ev.RunCancelled, ev.RunTimedOut, ev.RunFailed, ev.RunDenied)
"""Run endings that leave jobs running somewhere: their workers are told to stop."""

IN_FLIGHT = ("dispatched", "running")  # an attempt a worker may be working on


@dataclass(frozen=True)
class PublishJob:
    """Put ``job`` on its topic's work subject, then schedule its ``deadline`` timer (if any)."""

    job: Job
    deadline: TimerFired | None = None


Effect = PublishJob | TimerFired | Notification | CancelNotice
"""What a rule asks the service to do: a TimerFired is a timer to schedule."""


def heartbeat_timeout_ms(spec: Step) -> int:
    """How long a job may stay silent before its worker counts as gone."""
    return spec.heartbeat_timeout_ms or DEFAULT_HEARTBEAT_TIMEOUT_MS


def _spec(workflow: Workflow, state: StepState) -> Step:
    return workflow.steps[base_step_id(state.step_id)]


# -- dispatching -----------------------------------------------------------------------------
def cancel_notice(tenant: str, run_id: str, envelopes: Sequence[dict[str, Any]]) -> CancelNotice | None:
    """The notice that tells workers to stop, when this commit ended the run early."""
    ending = next((e for e in envelopes if e["type"] in RUN_ENDINGS), None)
    if ending is None:
        return None
    return CancelNotice(run_id=run_id, tenant=tenant, reason=(ending.get("data") or {}).get("reason", ""))


def job_due(state: StepState, now: datetime) -> bool:
    retry_due = state.status == "retry_wait" and (state.retry_due_at is None
                                                  or state.retry_due_at <= now + RETRY_EARLY_TOLERANCE)
    return (state.status == "released" and state.step_type == "job") or retry_due


def due_jobs(run: Run, now: datetime) -> list[StepState]:
    """The job steps :func:`dispatch` would dispatch now (released, or a retry that is due), for
    the workload controls and the gate to decide on first."""
    return [] if run.terminal else [state for state in run.steps.values() if job_due(state, now)]


def dispatch(run: Run, workflow: Workflow, now: datetime, control: Mapping[str, Decision] | None = None,
             guarded: Mapping[str, guard.Guarded] | None = None,
             held: Mapping[str, gate.Hold] | None = None) -> list[Effect]:
    """Dispatch every released job and every retry that is due; a released notify step is sent
    (its Notification) and succeeds at once. ``control``: the workload controls' decision per
    step (interlock.dispatcher.workload: breakers and agent versions; a step without one goes to
    any worker now). ``guarded``: the checked values of released guardrail steps (the service
    ran their checks, see :func:`guardrails_due`). ``held``: the jobs the gate holds back (step
    id -> why): each is recorded as throttled, once per attempt, instead (#16)."""
    effects: list[Effect] = []
    if run.terminal or run.paused:  # paused (issue 17): nothing new goes out until it is unpaused
        return effects
    for state in list(run.steps.values()):
        # guard (#17): an approved held output goes on; a guardrail step decides on its value
        if state.status == "released" and state.guard_hold is not None:
            guard.release_held(run, state)
            continue
        if state.status == "released" and state.step_type == "guardrail":
            if guarded is not None and state.step_id in guarded:
                guard.check_guardrail(run, state, guarded[state.step_id])
            continue
        if state.status == "released" and state.step_type == "notify":
            effects.append(_notify(run, workflow, state))
            continue
        if job_due(state, now):
            # -- workload controls (issue 16): hold, fail fast or route to an agent version
            decision = (control or {}).get(state.step_id, Route())
            if isinstance(decision, Hold):
                effects.extend(hold(run, state, decision))
                continue
            if isinstance(decision, FailFast):
                run.fail_step(ev.StepFailed(step_id=state.step_id, attempt=state.attempt, final=True,
                                            error=JobError(message=decision.message, retryable=False,
                                                           kind="circuit_open")))
                continue
            throttle = (held or {}).get(state.step_id)
            if throttle is not None:  # the gate (#16): a concurrency or rate limit holds it back
                effects.extend(_throttle(run, workflow, state, throttle, now))
                continue
            spec = _spec(workflow, state)
            attempt = state.attempt + 1
            run.dispatch_step(ev.StepDispatched(
                step_id=state.step_id, attempt=attempt, job_id=job_id(run.run_id, state.step_id, attempt),
                topic=state.topic or "",
                deadline=now + timedelta(milliseconds=spec.timeout_ms or DEFAULT_TIMEOUT_MS),
                agent_version=decision.version, route=decision.route))
            effects.append(publish_job(run, workflow, run.steps[state.step_id]))
    return effects


def hold(run: Run, state: StepState, decision: Hold) -> list[Effect]:
    """Keep a due job back: a StepHeld when this hold is new (not on every re-check), and a
    ``breaker`` timer that makes the dispatcher look again at ``decision.until``."""
    attempt = state.attempt + 1
    held = state.held
    if held is None or held.attempt != attempt or held.reason != decision.reason \
            or held.breaker_opened_at != decision.breaker_opened_at:
        run.hold_step(ev.StepHeld(step_id=state.step_id, attempt=attempt, topic=state.topic or "",
                                  reason=decision.reason,
                                  until=decision.until, breaker_opened_at=decision.breaker_opened_at,
                                  message=decision.message))
    return [TimerFired(kind="breaker", run_id=run.run_id, tenant=run.tenant, step_id=state.step_id,
                       attempt=attempt, due_at=decision.until)]




def _throttle(run: Run, workflow: Workflow, state: StepState, hold: gate.Hold, now: datetime) -> list[Effect]:
    """A job the gate holds back: StepThrottled (once per attempt), and for a rate limit a gate
    timer when its token is due; a job that can never pass (its limit key fails) fails."""
    attempt = state.attempt + 1
    if hold.fail:
        run.fail_step(ev.StepFailed(step_id=state.step_id, attempt=state.attempt, final=True,
                                    error=JobError(message=hold.reason, retryable=False, kind="limit")))
        return []
    if state.throttled != attempt:
        run.throttle_step(ev.StepThrottled(step_id=state.step_id, attempt=attempt, scope=hold.scope,
                                           reason=hold.reason, priority=gate.priority_of(run, workflow)))
    if hold.retry_in is None:
        return []
    return [TimerFired(kind="gate", run_id=run.run_id, tenant=run.tenant, step_id=state.step_id, attempt=attempt,
                       due_at=now + timedelta(seconds=hold.retry_in))]


def retry_due(run: Run, workflow: Workflow, timer: TimerFired, now: datetime,
              control: Mapping[str, Decision] | None = None,
              held: Mapping[str, gate.Hold] | None = None) -> list[Effect]:
    """A retry timer fired: dispatch what is due (:func:`dispatch`). A retry timer is scheduled
    only after its RetryScheduled is durable, so a run whose step has not reached that retry is
    behind the log (a copy of the service whose cache missed the commit another copy got):
    raises :class:`StaleState`, and the store reads the run forward, rather than deciding that
    nothing is due and dropping the timer."""
    state = run.steps.get(timer.step_id or "")
    if not run.terminal and state is not None and timer.attempt is not None and (
            state.attempt + 1 < timer.attempt
            or (state.attempt + 1 == timer.attempt and state.status != "retry_wait")):
        raise StaleState(f"retry timer for {timer.step_id!r} attempt {timer.attempt} is ahead of the run "
                         f"(attempt {state.attempt}, {state.status})")
    return dispatch(run, workflow, now, control, held=held)


def publish_job(run: Run, workflow: Workflow, state: StepState) -> PublishJob:
    """The job message for the step's current attempt, and its deadline timer.

    Only an explicit ``timeout_ms`` gets a durable timer: the default deadline (minutes away,
    rarely reached) is left to the reconciler, which saves a timer on every job.
    """
    spec = _spec(workflow, state)
    if state.job_id is None or not state.topic:
        raise ValueError(f"step {state.step_id!r} of run {run.run_id} has no dispatched job to publish")
    job = Job(
        job_id=state.job_id, run_id=run.run_id, tenant=run.tenant, workflow_id=run.workflow_id,
        step_id=state.step_id, topic=state.topic, attempt=state.attempt,
        idempotency_key=f"{run.run_id}:{state.step_id}", input=state.input, input_ref=state.input_ref,
        deadline=state.deadline, heartbeat_interval_ms=max(100, heartbeat_timeout_ms(spec) // 3),
        job_hash=state.job_hash, constraints=state.decision.constraints if state.decision else {},
        trace_parent=tracing.traceparent(run.run_id, state.job_id), record_prompts=workflow.record_prompts,
        sensitive_output=[] if state.compensation_of else list(workflow.sensitive_output_paths(
            base_step_id(state.step_id))),
        agent_version=state.agent_version,
    )
    deadline = None
    if state.deadline is not None and spec.timeout_ms is not None:
        deadline = TimerFired(kind="deadline", run_id=run.run_id, tenant=run.tenant, step_id=state.step_id,
                              attempt=state.attempt, due_at=state.deadline)
    return PublishJob(job, deadline)


def _run_summary(run: Run, step_id: str) -> str:
    """One line for a notify step without a message: the run and each step's state."""
    states = ", ".join(f"{sid}={st.status}" for sid, st in run.steps.items()
                       if sid != step_id and is_workflow_step(sid))
    return f"workflow {run.workflow_id} run {run.run_id}: {states or 'no steps'}"


def _notify(run: Run, workflow: Workflow, state: StepState) -> Notification:
    spec = _spec(workflow, state)
    if spec.message is None:
        text = _run_summary(run, state.step_id)
    else:
        text = render_text(spec.message, template_context(run, {}, run.input),
                           location=f"steps.{state.step_id}.message")
    subject = s.notify(run.tenant, spec.channel)
    run.succeed_step(ev.StepSucceeded(step_id=state.step_id, attempt=0, output={"subject": subject, "message": text}))
    return Notification(run_id=run.run_id, tenant=run.tenant, workflow_id=run.workflow_id, step_id=state.step_id,
                        channel=spec.channel, message=text, data=state.input)


def republish(run: Run, workflow: Workflow, envelopes: Sequence[dict[str, Any]],
              published: Container[str]) -> list[PublishJob]:
    """Jobs of the steps this commit names that wait for a worker yet were not published by this
    process: it crashed between its StepDispatched append and the publish (the commit that
    released the job comes back), or another copy dispatched them. Publish them again;
    JetStream's duplicate window drops a true duplicate. A job a worker already started is left
    alone (a copy after the window would run twice)."""
    named = {str(e["step_id"]) for e in envelopes if e.get("step_id")}
    jobs = []
    for step_id in named:
        state = run.steps.get(step_id)
        if state is not None and state.status == "dispatched" and state.job_id and state.job_id not in published:
            jobs.append(publish_job(run, workflow, state))
    return jobs


def retry_timers(run: Run, envelopes: Sequence[dict[str, Any]]) -> list[TimerFired]:
    """The retry timers of this commit's RetryScheduled events whose retry is still waiting: their
    scheduling again is dropped as a duplicate (same subject and due time), and it restores a
    timer lost to a crash between the commit and its scheduling, within the consumer's ack wait
    instead of at the next reconciler pass."""
    timers = []
    for envelope in envelopes:
        if envelope["type"] != ev.RetryScheduled.type_name:
            continue
        data = ev.RetryScheduled.model_validate(envelope["data"])
        state = run.steps.get(envelope["step_id"])
        waiting = state is not None and state.status == "retry_wait" and state.attempt + 1 == data.attempt
        if waiting and state is not None and not run.terminal:
            timers.append(TimerFired(kind="retry", run_id=run.run_id, tenant=run.tenant, step_id=state.step_id,
                                     attempt=data.attempt, due_at=data.due_at))
    return timers


def lost_jobs(run: Run, workflow: Workflow, published: Container[str]) -> list[PublishJob]:
    """Jobs still waiting for a worker that this process never published (the reconciler re-offers
    them; one still queued is deduplicated)."""
    return [publish_job(run, workflow, state) for state in run.steps.values()
            if state.status == "dispatched" and state.deadline is not None and state.job_id not in published]


def overdue_timers(run: Run, workflow: Workflow, now: datetime, heard_from: Container[str]) -> list[TimerFired]:
    """Deadline and lease timers that should have fired by now (a backstop for lost timers).

    ``heard_from`` holds the job ids this process has seen heartbeats from; a running job that
    no process heard from for two leases (and a grace) counts as silent.
    """
    fired = []
    for state in run.steps.values():
        if state.status not in IN_FLIGHT or state.deadline is None:
            continue
        overdue = now - state.deadline > OVERDUE_GRACE
        lease = timedelta(milliseconds=heartbeat_timeout_ms(_spec(workflow, state)))
        silent = (state.status == "running" and (state.job_id or "") not in heard_from
                  and state.last_heartbeat_at is not None and now - state.last_heartbeat_at > 2 * lease + OVERDUE_GRACE)
        if overdue or silent:
            fired.append(TimerFired(kind="deadline" if overdue else "lease", run_id=run.run_id, tenant=run.tenant,
                                    step_id=state.step_id, attempt=state.attempt, due_at=now))
    return fired


# -- outcomes --------------------------------------------------------------------------------
def record_result(run: Run, workflow: Workflow, result: JobResult, output: Any, now: datetime,
                  jitter: float, guarded: guard.Guarded | None = None) -> list[Effect]:
    """A worker's result: the attempt succeeds, fails (maybe retrying) or, when it is not the
    current attempt, is kept as evidence only. ``output`` is the result's resolved output;
    ``guarded``: its step's guard verdicts (the service ran the checks), which decide instead.

    Raises :class:`StaleState` for an attempt the run never dispatched (the run is behind).
    """
    state = run.steps.get(result.step_id)
    if state is None or result.attempt > state.attempt:
        raise StaleState(f"result for {result.step_id!r} attempt {result.attempt}, which run {run.run_id} "
                         "never dispatched")
    current = state.status in ACTIVE_ATTEMPT and result.attempt == state.attempt and not run.terminal
    if not current:
        if result.attempt == state.attempt and state.job_id == result.job_id and state.terminal:
            return []  # the outcome of this attempt is already recorded
        run.record_late_result(ev.LateResultRecorded(step_id=state.step_id, attempt=result.attempt,
                                                     ok=result.ok, worker=result.worker))
        return []
    spec = _spec(workflow, state)
    if result.ok:
        # a compensation job's output is whatever undoing returns: the step's schema is not for it
        problem = output_schema_error(output, spec.output_schema) if state.compensation_of is None else None
        over = step_overrun(state, result)
        guard_error = None
        if problem is None and over is None and guarded is not None:  # guard (#17): its verdicts decide
            guard_error = guard.record(run, state, guarded, attempt=result.attempt, worker=result.worker,
                                       calls=result.usage)
            if guard_error is None:
                return []
        elif problem is None and over is None:
            run.succeed_step(ev.StepSucceeded(step_id=state.step_id, attempt=result.attempt, output=result.output,
                                              output_ref=result.output_ref, worker=result.worker, usage=result.usage))
            return []
        if guard_error is not None:
            error = guard_error
        elif over is not None:  # spent is spent: a retry would spend again
            error = JobError(message=over.describe(f"step {state.step_id!r}"), retryable=False, kind="budget")
        else:
            error = JobError(message=f"output does not match output_schema: {problem}", retryable=False,
                             kind="output_schema")
    else:
        error = result.error or JobError(message="the worker reported a failure without a reason")
        if error.kind == "timeout" and state.status in IN_FLIGHT and state.deadline is not None \
                and now >= state.deadline - RETRY_EARLY_TOLERANCE:
            # the worker stopped at the deadline before our deadline timer fired: the log
            # records the same StepTimedOut whichever side noticed first
            run.time_out_step(ev.StepTimedOut(step_id=state.step_id, attempt=state.attempt, reason="deadline"))
    return _fail_attempt(run, state, spec, error, result.worker, now, jitter, result.usage)


def step_overrun(state: StepState, result: JobResult) -> usage.Overrun | None:
    """A result whose model usage (this attempt and the step's earlier ones) exceeds the budget
    policy handed the step (``max_cost_usd``, ``max_tokens`` constraints)."""
    constraints = state.decision.constraints if state.decision else {}
    try:
        limits = usage.parse_limits(constraints)
    except usage.BudgetError as e:  # a policy's bad constraint fails closed
        return usage.Overrun(f"a policy constraint ({e})", 0.0, 0.0)
    if not limits:
        return None
    return usage.overrun(usage.total([*state.usage, *result.usage]), limits)


def _fail_attempt(run: Run, state: StepState, spec: Step, error: JobError, worker: str, now: datetime,
                  jitter: float, calls: Sequence[LlmCall] = ()) -> list[Effect]:
    """Fail the current attempt: retry it after a backoff while attempts are left, else finally."""
    policy = spec.retries
    if error.retryable and state.attempt < policy.max_attempts:
        delay = policy.delay_ms(state.attempt, jitter)
        due = now + timedelta(milliseconds=delay)
        run.fail_step(ev.StepFailed(step_id=state.step_id, attempt=state.attempt, error=error, final=False,
                                    worker=worker, usage=list(calls)))
        run.schedule_retry(ev.RetryScheduled(step_id=state.step_id, attempt=state.attempt + 1, due_at=due,
                                             delay_ms=delay))
        return [TimerFired(kind="retry", run_id=run.run_id, tenant=run.tenant, step_id=state.step_id,
                           attempt=state.attempt + 1, due_at=due)]
    if error.retryable and policy.max_attempts > 1:
        error = error.model_copy(update={"message": f"{error.message} (after {state.attempt} attempts)"})
    run.fail_step(ev.StepFailed(step_id=state.step_id, attempt=state.attempt, error=error, final=True,
                                worker=worker, usage=list(calls)))
    return []


def _in_flight(run: Run, kind: str, step_id: str | None, attempt: int | None) -> StepState | None:
    """The step whose current attempt a heartbeat or timer is about, or None when that attempt
    ended meanwhile. Raises :class:`StaleState` when it names an attempt the run has not reached."""
    state = run.steps.get(step_id or "")
    if not run.terminal and (state is None or (attempt or 0) > state.attempt):
        raise StaleState(f"{kind} for {step_id!r} attempt {attempt} is ahead of the run")
    if run.terminal or state is None or state.status not in IN_FLIGHT or state.attempt != attempt:
        return None
    return state


def record_heartbeat(run: Run, workflow: Workflow, beat: Heartbeat, now: datetime, *, first: bool) -> list[Effect]:
    """A worker's heartbeat renews the attempt's lease (a lease timer one heartbeat timeout on).

    The log keeps a heartbeat once a third of the lease has passed since the last one (or since
    dispatch), not every one: short jobs add no heartbeat events, long ones leave enough to
    recover their leases after a restart. ``first``: the first heartbeat this process saw for
    the job, which schedules the lease even when the log keeps nothing.
    """
    state = _in_flight(run, "heartbeat", beat.step_id, beat.attempt)
    if state is None:
        return []
    timeout = timedelta(milliseconds=heartbeat_timeout_ms(_spec(workflow, state)))
    lease = TimerFired(kind="lease", run_id=run.run_id, tenant=run.tenant, step_id=state.step_id,
                       attempt=beat.attempt, due_at=now + timeout)
    since = state.last_heartbeat_at or state.dispatched_at or now
    if now - since < timeout / 3:
        return [lease] if first else []
    run.record_heartbeat(ev.StepHeartbeat(step_id=state.step_id, attempt=beat.attempt, worker=beat.worker,
                                          progress=beat.progress))
    return [lease]


def timer_fired(run: Run, workflow: Workflow, timer: TimerFired, now: datetime, *,
                heartbeat_seen_at: datetime | None, jitter: float) -> list[Effect]:
    """A deadline or lease timer: time the attempt out (and retry or fail it) if it is still in
    flight and really late; a lease renewed since is followed by a timer at its new end.

    ``heartbeat_seen_at``: when this process last heard from the attempt's worker (heartbeats
    that the log did not keep), or None.
    """
    state = _in_flight(run, f"{timer.kind} timer", timer.step_id, timer.attempt)
    if state is None:
        return []  # the attempt ended meanwhile: the timer has nothing to do
    spec = _spec(workflow, state)
    if timer.kind == "lease":
        timeout = timedelta(milliseconds=heartbeat_timeout_ms(spec))
        last = state.last_heartbeat_at or state.dispatched_at or now
        if heartbeat_seen_at is not None:
            last = max(last, heartbeat_seen_at)
        if now - last < timeout:
            return [timer.model_copy(update={"due_at": last + timeout})]
        reason, message = "heartbeat", f"no heartbeat for {timeout.total_seconds():g}s: the worker is gone"
    else:
        if state.deadline is not None and state.deadline > now + RETRY_EARLY_TOLERANCE:
            return []
        reason, message = "deadline", f"attempt {state.attempt} exceeded its timeout"
    run.time_out_step(ev.StepTimedOut(step_id=state.step_id, attempt=state.attempt, reason=reason))
    return _fail_attempt(run, state, spec, JobError(message=message, retryable=True, kind="timeout"), "", now,
                         jitter)
