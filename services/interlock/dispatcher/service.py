"""The dispatcher: hands released jobs to agents and turns what comes back into outcomes.

Order of effects, so a crash anywhere repeats nothing and loses nothing:
1. ``StepDispatched`` is appended (the allow decision is already in the log before it);
2. the job is published with ``Nats-Msg-Id = job id`` (a re-publish after a crash is dropped
   by JetStream's duplicate window);
3. deadline and lease timers are scheduled durably; when they fire, the run's state decides.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg

from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import CancelNotice, Heartbeat, Job, JobError, JobResult, Notification, TimerFired
from interlock.core.eventstore import StaleState
from interlock.core.ids import job_id
from interlock.core.run import ACTIVE_ATTEMPT, Run, StepState
from interlock.core.workflow import Step, Workflow, render_text
from interlock.planner.logic import base_step_id, output_schema_error, template_context
from interlock.runtime import timers, tracing
from interlock.runtime.publish import publish
from interlock.runtime.service import Poison, Service, decode

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MS = 5 * 60 * 1000
DEFAULT_HEARTBEAT_TIMEOUT_MS = 15_000
RETRY_EARLY_TOLERANCE = timedelta(milliseconds=50)
OVERDUE_GRACE = timedelta(seconds=5)  # the reconciler acts only when a timer is clearly late


def heartbeat_timeout_ms(spec: Step) -> int:
    return spec.heartbeat_timeout_ms or DEFAULT_HEARTBEAT_TIMEOUT_MS


class DispatcherService(Service):
    name = "dispatcher"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._published: set[str] = set()
        self._heartbeats: dict[str, float] = {}  # job id -> monotonic time of the latest heartbeat
        # jobs whose outcome this process recorded: their lease and deadline timers, which fire
        # long after, are dropped without reloading the (by then finished) run
        self._finished_jobs: OrderedDict[str, None] = OrderedDict()
        self._rng = random.Random()

    def register(self, broker: NatsBroker) -> None:
        self.pull_commits(broker, self.on_commit, wants=frozenset({
            "PolicyDecided", "ApprovalGranted", "StepDispatched", "RunCancelled", "RunTimedOut", "RunFailed",
            "RunDenied", "RetryScheduled",
        }))
        self.pull(broker, s.RESULTS_ALL, s.RESULTS_STREAM, self.durable("results"), self.on_result)
        self.pull(broker, s.HEARTBEATS_ALL, s.RESULTS_STREAM, self.durable("heartbeats"), self.on_heartbeat)
        for kind in ("retry", "deadline", "lease"):
            self.pull(broker, s.timer_fired(kind), s.TIMERS_STREAM, self.durable(f"timer_{kind}"), self.on_timer)

    # -- dispatching -------------------------------------------------------------------------
    async def on_commit(self, tenant: str, run_id: str, envelopes: list[dict[str, Any]]) -> None:
        types = {e["type"] for e in envelopes}
        if types & {"RunCancelled", "RunTimedOut", "RunFailed", "RunDenied"}:
            reason = next((e["data"].get("reason", "") for e in envelopes if e["type"].startswith("Run")), "")
            await self.nc.publish(s.control_cancel(tenant, run_id),
                                  CancelNotice(run_id=run_id, tenant=tenant, reason=reason).model_dump_json().encode())
            return
        handle = await self.dispatch(tenant, run_id)
        # a StepDispatched this process did not publish (it crashed between append and publish,
        # or another copy did): publish again; the duplicate window drops true duplicates
        for envelope in envelopes:
            if envelope["type"] == "StepDispatched" and envelope["data"]["job_id"] not in self._published:
                state = handle.steps.get(envelope["step_id"])
                if state is not None and state.status in ACTIVE_ATTEMPT and state.job_id == envelope["data"]["job_id"]:
                    workflow = await self.registry.get(handle.workflow_id, handle.workflow_version)
                    await self.publish_job(handle, workflow, state)

    async def reconcile(self, tenant: str, run_id: str) -> None:
        """Dispatch what is due, re-offer jobs whose message may be lost, and time out attempts
        whose timers never fired (a backstop: the durable timers normally do this)."""
        run = await self.dispatch(tenant, run_id)
        now = datetime.now(UTC)
        workflow = await self.registry.get(run.workflow_id, run.workflow_version)
        for state in list(run.steps.values()):
            if state.status not in ("dispatched", "running") or state.deadline is None:
                continue
            if state.status == "dispatched" and state.job_id not in self._published:
                await self.publish_job(run, workflow, state)  # deduplicated if it is still queued
            overdue = now - state.deadline > OVERDUE_GRACE
            spec = workflow.steps[base_step_id(state.step_id)]
            lease = timedelta(milliseconds=heartbeat_timeout_ms(spec))
            seen = self._heartbeats.get(state.job_id or "")
            silent = (state.status == "running" and seen is None and state.last_heartbeat_at is not None
                      and now - state.last_heartbeat_at > 2 * lease + OVERDUE_GRACE)
            if overdue or silent:
                kind = "deadline" if overdue else "lease"
                await self.on_timer_fired(TimerFired(kind=kind, run_id=run_id, tenant=tenant, step_id=state.step_id,
                                                     attempt=state.attempt, due_at=now))

    async def dispatch(self, tenant: str, run_id: str) -> Run:
        """Dispatch every released job and every retry that is due; publish notifications."""
        dispatched: list[str] = []

        async def decide(run: Run) -> None:
            dispatched.clear()
            if run.terminal:
                return
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            now = datetime.now(UTC)
            for state in list(run.steps.values()):
                if state.status == "released" and state.step_type == "notify":
                    await self.notify(run, workflow, state)
                    continue
                due = state.status == "retry_wait" and (state.retry_due_at is None
                                                        or state.retry_due_at <= now + RETRY_EARLY_TOLERANCE)
                if (state.status == "released" and state.step_type == "job") or due:
                    spec = workflow.steps[base_step_id(state.step_id)]
                    attempt = state.attempt + 1
                    run.dispatch_step(ev.StepDispatched(
                        step_id=state.step_id, attempt=attempt, job_id=job_id(run.run_id, state.step_id, attempt),
                        topic=state.topic or "", deadline=now + timedelta(milliseconds=spec.timeout_ms
                                                                          or DEFAULT_TIMEOUT_MS)))
                    dispatched.append(state.step_id)

        handle, _ = await self.store.update(tenant, run_id, decide)
        if dispatched:
            workflow = await self.registry.get(handle.run.workflow_id, handle.run.workflow_version)
            await asyncio.gather(*(self.publish_job(handle.run, workflow, handle.run.steps[sid])
                                   for sid in dispatched))
        return handle.run

    async def publish_job(self, run: Run, workflow: Workflow, state: StepState) -> None:
        spec = workflow.steps[base_step_id(state.step_id)]
        assert state.job_id is not None and state.topic
        job_input, input_ref = state.input, state.input_ref
        if input_ref is None:
            job_input, input_ref = await self.payloads.offload(job_input)
        hb_timeout = heartbeat_timeout_ms(spec)
        job = Job(
            job_id=state.job_id, run_id=run.run_id, tenant=run.tenant, workflow_id=run.workflow_id,
            step_id=state.step_id, topic=state.topic, attempt=state.attempt,
            idempotency_key=f"{run.run_id}:{state.step_id}", input=job_input, input_ref=input_ref,
            deadline=state.deadline, heartbeat_interval_ms=max(100, hb_timeout // 3), job_hash=state.job_hash,
            constraints=state.decision.constraints if state.decision else {},
            trace_parent=tracing.traceparent(run.run_id, state.job_id),
        )
        await publish(self.js, s.job(state.topic), job.model_dump_json().encode(),
                      headers={"Nats-Msg-Id": state.job_id, "traceparent": job.trace_parent or ""})
        self._published.add(state.job_id)
        if len(self._published) > 100_000:
            self._published.clear()
        # an explicit timeout gets a durable timer; the default deadline (minutes away, rarely
        # reached) is left to the reconciler sweep, which saves a timer on every job
        if state.deadline is not None and spec.timeout_ms is not None:
            await timers.schedule(self.js, TimerFired(kind="deadline", run_id=run.run_id, tenant=run.tenant,
                                                      step_id=state.step_id, attempt=state.attempt,
                                                      due_at=state.deadline))

    async def notify(self, run: Run, workflow: Workflow, state: StepState) -> None:
        spec = workflow.steps[base_step_id(state.step_id)]
        context = template_context(run, {}, run.input)
        text = render_text(spec.message or f"{run.workflow_id}: {state.step_id}", context,
                           location=f"steps.{state.step_id}.message")
        note = Notification(run_id=run.run_id, tenant=run.tenant, workflow_id=run.workflow_id,
                            step_id=state.step_id, channel=spec.channel, message=text, data=state.input)
        subject = s.notify(run.tenant, spec.channel)
        # published before the outcome is appended, deduplicated by id, so it is sent exactly once
        await publish(self.js, subject, note.model_dump_json().encode(),
                      headers={"Nats-Msg-Id": f"notify:{run.run_id}:{state.step_id}"})
        run.succeed_step(ev.StepSucceeded(step_id=state.step_id, attempt=0,
                                          output={"subject": subject, "message": text}))

    # -- outcomes ----------------------------------------------------------------------------
    async def on_result(self, msg: Msg) -> None:
        result = decode(msg, JobResult)
        if msg.subject != s.result(result.tenant, result.run_id):
            raise Poison(f"result for run {result.run_id} arrived on {msg.subject}")
        retries: list[TimerFired] = []
        self._heartbeats.pop(result.job_id, None)

        async def decide(run: Run) -> None:
            retries.clear()
            state = run.steps.get(result.step_id)
            if state is None or result.attempt > state.attempt:
                raise StaleState(f"result for {result.step_id!r} attempt {result.attempt}, which run {run.run_id} "
                                 "never dispatched")
            current = state.status in ACTIVE_ATTEMPT and result.attempt == state.attempt and not run.terminal
            if not current:
                if result.attempt == state.attempt and state.job_id == result.job_id and state.terminal:
                    return  # the outcome of this attempt is already recorded
                if result.attempt <= state.attempt:
                    run.record_late_result(ev.LateResultRecorded(step_id=state.step_id, attempt=result.attempt,
                                                                 ok=result.ok, worker=result.worker))
                return
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            spec = workflow.steps[base_step_id(state.step_id)]
            if result.ok:
                output = await self.payloads.resolve(result.output, result.output_ref)
                problem = output_schema_error(output, spec.output_schema) if state.compensation_of is None else None
                if problem is None:
                    run.succeed_step(ev.StepSucceeded(step_id=state.step_id, attempt=result.attempt,
                                                      output=result.output, output_ref=result.output_ref,
                                                      worker=result.worker))
                    return
                error = JobError(message=f"output does not match output_schema: {problem}", retryable=False,
                                 kind="output_schema")
            else:
                error = result.error or JobError(message="the worker reported a failure without a reason")
                if error.kind == "timeout" and state.status in ("dispatched", "running") \
                        and state.deadline is not None \
                        and datetime.now(UTC) >= state.deadline - RETRY_EARLY_TOLERANCE:
                    # the worker stopped at the deadline before our deadline timer fired: the
                    # log records the same StepTimedOut whichever side noticed first
                    run.time_out_step(ev.StepTimedOut(step_id=state.step_id, attempt=state.attempt,
                                                      reason="deadline"))
            self.fail_attempt(run, state, spec, error, result.worker, retries)

        await self.store.update(result.tenant, result.run_id, decide)
        self._finished_jobs[result.job_id] = None  # only once the outcome is durable
        while len(self._finished_jobs) > 100_000:
            self._finished_jobs.popitem(last=False)
        for timer in retries:
            await timers.schedule(self.js, timer)

    def fail_attempt(self, run: Run, state: StepState, spec: Step, error: JobError, worker: str,
                     retries: list[TimerFired]) -> None:
        policy = spec.retries
        if error.retryable and state.attempt < policy.max_attempts:
            delay = policy.delay_ms(state.attempt, self._rng.random())
            due = datetime.now(UTC) + timedelta(milliseconds=delay)
            run.fail_step(ev.StepFailed(step_id=state.step_id, attempt=state.attempt, error=error, final=False,
                                        worker=worker))
            run.schedule_retry(ev.RetryScheduled(step_id=state.step_id, attempt=state.attempt + 1, due_at=due,
                                                 delay_ms=delay))
            retries.append(TimerFired(kind="retry", run_id=run.run_id, tenant=run.tenant, step_id=state.step_id,
                                      attempt=state.attempt + 1, due_at=due))
        else:
            if error.retryable and policy.max_attempts > 1:
                error = error.model_copy(update={"message": f"{error.message} (after {state.attempt} attempts)"})
            run.fail_step(ev.StepFailed(step_id=state.step_id, attempt=state.attempt, error=error, final=True,
                                        worker=worker))

    async def on_heartbeat(self, msg: Msg) -> None:
        beat = decode(msg, Heartbeat)
        first = beat.job_id not in self._heartbeats
        self._heartbeats[beat.job_id] = time.monotonic()
        leases: list[TimerFired] = []

        async def decide(run: Run) -> None:
            leases.clear()
            state = run.steps.get(beat.step_id)
            if not run.terminal and (state is None or beat.attempt > state.attempt):
                raise StaleState(f"heartbeat for {beat.step_id!r} attempt {beat.attempt} is ahead of the run")
            if run.terminal or state is None or state.status not in ("dispatched", "running") \
                    or state.attempt != beat.attempt:
                return
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            timeout = timedelta(milliseconds=heartbeat_timeout_ms(workflow.steps[base_step_id(state.step_id)]))
            now = datetime.now(UTC)
            lease = TimerFired(kind="lease", run_id=run.run_id, tenant=run.tenant, step_id=state.step_id,
                               attempt=beat.attempt, due_at=now + timeout)
            # The log keeps a heartbeat once a third of the lease has passed since the last one
            # (or since dispatch), not every one: short jobs add no heartbeat events, long ones
            # leave enough to recover their leases after a restart.
            since = state.last_heartbeat_at or state.dispatched_at or now
            if now - since < timeout / 3:
                if first:
                    leases.append(lease)
                return
            run.record_heartbeat(ev.StepHeartbeat(step_id=state.step_id, attempt=beat.attempt, worker=beat.worker,
                                                  progress=beat.progress))
            leases.append(lease)

        await self.store.update(beat.tenant, beat.run_id, decide)
        for timer in leases:
            await timers.schedule(self.js, timer)

    # -- timers ------------------------------------------------------------------------------
    async def on_timer(self, msg: Msg) -> None:
        timer = decode(msg, TimerFired)
        await self.on_timer_fired(timer)

    async def on_timer_fired(self, timer: TimerFired) -> None:
        if timer.kind in ("lease", "deadline") and timer.step_id and timer.attempt \
                and job_id(timer.run_id, timer.step_id, timer.attempt) in self._finished_jobs:
            return  # the attempt ended here already: nothing for the timer to do
        if timer.kind == "retry":
            await self.dispatch(timer.tenant, timer.run_id)
            return
        follow_up: list[TimerFired] = []

        async def decide(run: Run) -> None:
            follow_up.clear()
            state = run.steps.get(timer.step_id or "")
            if not run.terminal and (state is None or (timer.attempt or 0) > state.attempt):
                raise StaleState(f"{timer.kind} timer for {timer.step_id!r} #{timer.attempt} is ahead of the run")
            if run.terminal or state is None or state.status not in ("dispatched", "running") \
                    or state.attempt != timer.attempt:
                return  # the attempt ended meanwhile: the timer has nothing to do
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            spec = workflow.steps[base_step_id(state.step_id)]
            now = datetime.now(UTC)
            if timer.kind == "lease":
                timeout = timedelta(milliseconds=heartbeat_timeout_ms(spec))
                seen = self._heartbeats.get(state.job_id or "")
                last = state.last_heartbeat_at or state.dispatched_at or now
                if seen is not None:
                    last = max(last, now - timedelta(seconds=time.monotonic() - seen))
                if now - last < timeout:
                    follow_up.append(timer.model_copy(update={"due_at": last + timeout}))
                    return
                reason, message = "heartbeat", f"no heartbeat for {timeout.total_seconds():g}s: the worker is gone"
            else:
                if state.deadline is not None and state.deadline > now + RETRY_EARLY_TOLERANCE:
                    return
                reason, message = "deadline", f"attempt {state.attempt} exceeded its timeout"
            run.time_out_step(ev.StepTimedOut(step_id=state.step_id, attempt=state.attempt, reason=reason))
            self.fail_attempt(run, state, spec, JobError(message=message, retryable=True, kind="timeout"), "",
                              follow_up)

        await self.store.update(timer.tenant, timer.run_id, decide)
        for next_timer in follow_up:
            await timers.schedule(self.js, next_timer)
