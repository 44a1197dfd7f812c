"""The Run aggregate: the whole life of one run and its steps, as an event-sourced object.

Commands (imperative methods such as :meth:`Run.dispatch_step`) check that the transition is
legal and raise :class:`IllegalTransition` otherwise; events (nested past-tense classes such as
``Run.StepDispatched``) only change state, so replaying a log never fails on a rule that
changed later. The event *data* types are the contracts in :mod:`interlock.contracts.events`;
this module adds behaviour, not shapes: the nested event classes are generated from the
registry ``ev.EVENT_TYPES``, and each type's state change (a ``_on_<Type>`` method) is listed
in a table checked complete against it when the module is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Literal
from uuid import UUID

from eventsourcing.domain import Aggregate

from interlock.contracts import events as ev
from interlock.contracts import routing
from interlock.contracts.messages import JobError, LlmCall, PayloadRef

RunStatus = Literal["running", "compensating", "succeeded", "failed", "denied", "cancelled", "timed_out"]
StepStatus = Literal[
    "ready",  # dependencies met, waiting for policy
    "awaiting_approval",  # policy or an approval step waits for a person
    "released",  # allowed (and approved where needed): may be dispatched
    "dispatched",  # job published, no heartbeat yet
    "running",  # a worker heartbeats
    "retry_wait",  # failed, next attempt scheduled
    "timed_out",  # the current attempt timed out; a failure or retry follows
    "expanded",  # a for_each parent whose items run
    "succeeded",
    "failed",
    "skipped",
    "denied",
    "cancelled",
]
TERMINAL_RUN: frozenset[str] = frozenset({"succeeded", "failed", "denied", "cancelled", "timed_out"})
TERMINAL_STEP: frozenset[str] = frozenset({"succeeded", "failed", "skipped", "denied", "cancelled"})
ACTIVE_ATTEMPT: frozenset[str] = frozenset({"dispatched", "running", "timed_out"})


class IllegalTransition(Exception):
    """A command that the run's current state does not allow."""

    def __init__(self, run_id: str, command: str, why: str, step_id: str | None = None) -> None:
        where = f"run {run_id}" + (f" step {step_id!r}" if step_id else "")
        super().__init__(f"{command} refused for {where}: {why}")
        self.run_id = run_id
        self.command = command
        self.why = why
        self.step_id = step_id


@dataclass
class ApprovalState:
    status: Literal["requested", "granted", "rejected", "expired"]
    job_hash: str
    snapshot_id: str
    approver_role: str
    expires_at: datetime | None = None
    approver: str | None = None
    reason: str = ""
    escalate_at: datetime | None = None


@dataclass
class StepState:
    step_id: str
    status: StepStatus
    step_type: str = "job"
    topic: str | None = None
    input: Any = None
    input_ref: PayloadRef | None = None
    job_hash: str = ""
    parent_id: str | None = None
    compensation_of: str | None = None
    attempt: int = 0
    decision: ev.PolicyDecided | None = None
    approval: ApprovalState | None = None
    job_id: str | None = None
    deadline: datetime | None = None
    dispatched_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    retry_due_at: datetime | None = None
    output: Any = None
    output_ref: PayloadRef | None = None
    error: JobError | None = None
    item_count: int | None = None
    updated_at: datetime | None = None
    usage: list[LlmCall] = field(default_factory=list)  # every attempt's model calls
    cache_hit: ev.StepCacheHit | None = None  # result cache (issue 17): the output reused instead of a job
    # guard (#17): the role that may release an output a guard held for approval (it is in
    # ``output``); once granted the step is "released" and the dispatcher succeeds it with it
    guard_hold: str | None = None
    agent_version: str = ""  # the version the current attempt was routed to ('' = any worker)
    held: ev.StepHeld | None = None  # the dispatcher's latest hold of the next attempt (issue 16)
    throttled: int | None = None  # the attempt a workload limit holds back (StepThrottled), until dispatched
    # attempts timed out for a lost heartbeat with no result yet -> their deadline: the worker may
    # still run them (it was slow, or the job went to another copy), so they keep their slots (#16)
    lost_attempts: dict[int, datetime | None] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STEP


@dataclass
class CompensationState:
    failed_step: str
    steps: list[str]
    finished: bool = False
    ok: bool = True
    failed_steps: list[str] = field(default_factory=list)


class Run(Aggregate):
    """One run of one workflow version, for one tenant."""

    # -- events ------------------------------------------------------------------------------
    class Event(Aggregate.Event):
        data: ev.EventData

        def apply(self, aggregate: Run) -> None:
            aggregate._when(self.data, self.timestamp)

    # the created event is declared here (eventsourcing needs it in the class body); the other
    # event classes are generated from the registry below the class, one per event type
    class Started(Aggregate.Created):
        data: ev.RunStarted

    # contract type name -> aggregate event class; filled in below the class
    EVENT_CLASSES: ClassVar[dict[str, type[Any]]] = {}

    def __init__(self, data: ev.RunStarted) -> None:
        self.tenant = data.tenant
        self.workflow_id = data.workflow_id
        self.workflow_version = data.workflow_version
        self.definition_hash = data.definition_hash
        self.input = data.input
        self.input_ref = data.input_ref
        self.idempotency_key = data.idempotency_key
        self.requested_by = data.requested_by
        self.rerun_of = data.rerun_of
        self.reused_outputs = dict(data.reused_outputs)
        self.status: RunStatus = "running"
        self.steps: dict[str, StepState] = {}
        self.compensation: CompensationState | None = None
        self.result: Any = None
        self.reason: str = ""
        self.ended_at: datetime | None = None
        self.admission: ev.RunAdmitted | None = None
        self.paused = False  # a person paused dispatching (issue 17); jobs already out finish
        self.data = data

    # -- identity ----------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return str(self.id)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_RUN

    @property
    def priority(self) -> int:
        """The priority the run was started with (1-5), 0 when it named none (the workflow's applies)."""
        return self.data.priority or 0

    @property
    def lane(self) -> str:
        """The lane its commits are appended in (#16): the one its RunStarted names, else its priority's."""
        return self.data.lane or routing.lane_of(self.data.priority)

    # -- commands ----------------------------------------------------------------------------
    @classmethod
    def start(cls, run_id: UUID, data: ev.RunStarted, at: datetime | None = None) -> Run:
        return cls._create(cls.Started, id=run_id, data=data, timestamp=at)

    def _trigger(self, data: ev.EventData) -> None:
        self.trigger_event(self.EVENT_CLASSES[data.type_name], data=data)

    def _refuse(self, command: str, why: str, step_id: str | None = None) -> IllegalTransition:
        return IllegalTransition(self.run_id, command, why, step_id)

    def _require_running(self, command: str, *, compensating_ok: bool = False) -> None:
        allowed = ("running", "compensating") if compensating_ok else ("running",)
        if self.status not in allowed:
            raise self._refuse(command, f"run is {self.status}")

    def _step(self, command: str, step_id: str, *statuses: str) -> StepState:
        step = self.steps.get(step_id)
        if step is None:
            raise self._refuse(command, "step has not been made ready", step_id)
        if statuses and step.status not in statuses:
            raise self._refuse(command, f"step is {step.status}, expected {' or '.join(statuses)}", step_id)
        return step

    def admit(self, data: ev.RunAdmitted) -> None:
        self._require_running("admit")
        if self.admission is not None:
            raise self._refuse("admit", "the run was already admitted")
        self._trigger(data)

    def mark_step_ready(self, data: ev.StepReady) -> None:
        self._require_running("mark_step_ready", compensating_ok=data.compensation_of is not None)
        if data.step_id in self.steps:
            raise self._refuse("mark_step_ready", "step is already ready", data.step_id)
        if data.parent_id is not None and data.parent_id not in self.steps:
            raise self._refuse("mark_step_ready", f"parent {data.parent_id!r} was not expanded", data.step_id)
        self._trigger(data)

    def expand_step(self, data: ev.StepExpanded) -> None:
        self._require_running("expand_step")
        if data.step_id in self.steps:
            raise self._refuse("expand_step", "step already started", data.step_id)
        self._trigger(data)

    def decide_policy(self, data: ev.PolicyDecided) -> None:
        self._require_running("decide_policy", compensating_ok=True)
        step = self._step("decide_policy", data.step_id, "ready")
        if data.job_hash != step.job_hash:
            raise self._refuse("decide_policy", "decision is for another job hash", data.step_id)
        self._trigger(data)

    def request_approval(self, data: ev.ApprovalRequested) -> None:
        self._require_running("request_approval", compensating_ok=True)
        step = self._step("request_approval", data.step_id, "awaiting_approval", "released")
        if step.status == "released" and step.step_type != "approval":
            raise self._refuse("request_approval", "job is already released", data.step_id)
        if step.approval is not None and step.approval.status == "requested":
            raise self._refuse("request_approval", "an approval request is already pending", data.step_id)
        if data.job_hash != step.job_hash:
            raise self._refuse("request_approval", "request is for another job hash", data.step_id)
        self._trigger(data)

    def _pending_approval(self, command: str, step_id: str, job_hash: str) -> StepState:
        self._require_running(command, compensating_ok=True)
        step = self._step(command, step_id, "awaiting_approval")
        if step.approval is None or step.approval.status != "requested":
            raise self._refuse(command, "no approval request is pending", step_id)
        if job_hash != step.approval.job_hash:
            raise self._refuse(
                command, f"decision names job hash {job_hash[:12]}…, the request is for "
                f"{step.approval.job_hash[:12]}…", step_id,
            )
        return step

    def grant_approval(self, data: ev.ApprovalGranted, now: datetime) -> None:
        step = self._pending_approval("grant_approval", data.step_id, data.job_hash)
        assert step.approval is not None
        if step.approval.expires_at is not None and now >= step.approval.expires_at:
            raise self._refuse("grant_approval", "the approval request has expired", data.step_id)
        if data.role != step.approval.approver_role:
            raise self._refuse(
                "grant_approval", f"role {data.role!r} may not decide, {step.approval.approver_role!r} may",
                data.step_id,
            )
        self._trigger(data)

    def reject_approval(self, data: ev.ApprovalRejected) -> None:
        step = self._pending_approval("reject_approval", data.step_id, data.job_hash)
        assert step.approval is not None
        if data.role != step.approval.approver_role:
            raise self._refuse(
                "reject_approval", f"role {data.role!r} may not decide, {step.approval.approver_role!r} may",
                data.step_id,
            )
        self._trigger(data)

    def refuse_approval(self, data: ev.ApprovalRefused) -> None:
        """Record a refused decision on a pending request; it changes nothing."""
        self._require_running("refuse_approval")
        step = self._step("refuse_approval", data.step_id)
        if step.approval is None or step.approval.status != "requested":
            raise self._refuse("refuse_approval", "no approval is pending", data.step_id)
        self._trigger(data)

    def expire_approval(self, data: ev.ApprovalExpired) -> None:
        self._pending_approval("expire_approval", data.step_id, data.job_hash)
        self._trigger(data)

    def invalidate_approval(self, data: ev.ApprovalInvalidated) -> None:
        self._pending_approval("invalidate_approval", data.step_id, data.job_hash)
        self._trigger(data)

    def escalate_approval(self, data: ev.ApprovalEscalated) -> None:
        step = self._pending_approval("escalate_approval", data.step_id, data.job_hash)
        assert step.approval is not None
        if data.from_role != step.approval.approver_role:
            raise self._refuse("escalate_approval", f"the request is for role {step.approval.approver_role!r}",
                               data.step_id)
        self._trigger(data)

    def dispatch_step(self, data: ev.StepDispatched) -> None:
        self._require_running("dispatch_step", compensating_ok=True)
        step = self._step("dispatch_step", data.step_id, "released", "retry_wait")
        if data.attempt != step.attempt + 1:
            raise self._refuse("dispatch_step", f"attempt {data.attempt} is not next ({step.attempt + 1})",
                               data.step_id)
        self._trigger(data)

    def hold_step(self, data: ev.StepHeld) -> None:
        self._require_running("hold_step", compensating_ok=True)
        step = self._step("hold_step", data.step_id, "released", "retry_wait")
        if data.attempt != step.attempt + 1:
            raise self._refuse("hold_step", f"attempt {data.attempt} is not next ({step.attempt + 1})", data.step_id)
        self._trigger(data)

    def throttle_step(self, data: ev.StepThrottled) -> None:
        self._require_running("throttle_step", compensating_ok=True)
        step = self._step("throttle_step", data.step_id, "released", "retry_wait")
        if data.attempt != step.attempt + 1:
            raise self._refuse("throttle_step", f"attempt {data.attempt} is not next ({step.attempt + 1})",
                               data.step_id)
        if step.throttled == data.attempt:
            raise self._refuse("throttle_step", f"attempt {data.attempt} is throttled already", data.step_id)
        self._trigger(data)

    def record_heartbeat(self, data: ev.StepHeartbeat) -> None:
        self._require_running("record_heartbeat", compensating_ok=True)
        step = self._step("record_heartbeat", data.step_id, "dispatched", "running")
        if data.attempt != step.attempt:
            raise self._refuse("record_heartbeat", f"attempt {data.attempt} is not current", data.step_id)
        self._trigger(data)

    def succeed_step(self, data: ev.StepSucceeded) -> None:
        self._require_running("succeed_step", compensating_ok=True)
        step = self._step("succeed_step", data.step_id)
        reused = step.status == "ready" and data.step_id in self.reused_outputs
        # result cache (issue 17): a released job whose cache hit is recorded succeeds without a job
        reused = reused or (step.status == "released" and step.cache_hit is not None and data.attempt == 0)
        released_hold = step.guard_hold is not None and step.status == "released"  # guard (#17)
        if step.step_type == "job" and step.item_count is None and not reused and not released_hold:
            if step.status not in ACTIVE_ATTEMPT or data.attempt != step.attempt:
                raise self._refuse("succeed_step", f"attempt {data.attempt} is not running", data.step_id)
        elif step.terminal:
            raise self._refuse("succeed_step", f"step is {step.status}", data.step_id)
        self._trigger(data)

    def check_guard(self, data: ev.GuardChecked) -> None:
        """Record a guard check's verdict on the current attempt's output (a job step) or on the
        value a released guardrail step checks (#17)."""
        self._require_running("check_guard", compensating_ok=True)
        step = self._step("check_guard", data.step_id)
        if step.step_type == "guardrail":
            if step.status != "released":
                raise self._refuse("check_guard", f"step is {step.status}, expected released", data.step_id)
        elif step.status not in ACTIVE_ATTEMPT or data.attempt != step.attempt:
            raise self._refuse("check_guard", f"attempt {data.attempt} is not running", data.step_id)
        self._trigger(data)

    def fail_step(self, data: ev.StepFailed) -> None:
        self._require_running("fail_step", compensating_ok=True)
        step = self._step("fail_step", data.step_id)
        if step.terminal:
            raise self._refuse("fail_step", f"step is {step.status}", data.step_id)
        if step.status in ACTIVE_ATTEMPT and data.attempt != step.attempt:
            raise self._refuse("fail_step", f"attempt {data.attempt} is not current", data.step_id)
        self._trigger(data)

    def schedule_retry(self, data: ev.RetryScheduled) -> None:
        self._require_running("schedule_retry", compensating_ok=True)
        step = self._step("schedule_retry", data.step_id, "dispatched", "running", "timed_out")
        if data.attempt != step.attempt + 1:
            raise self._refuse("schedule_retry", f"attempt {data.attempt} is not next", data.step_id)
        self._trigger(data)

    def time_out_step(self, data: ev.StepTimedOut) -> None:
        self._require_running("time_out_step", compensating_ok=True)
        step = self._step("time_out_step", data.step_id, "dispatched", "running")
        if data.attempt != step.attempt:
            raise self._refuse("time_out_step", f"attempt {data.attempt} is not current", data.step_id)
        self._trigger(data)

    def skip_step(self, data: ev.StepSkipped) -> None:
        self._require_running("skip_step")
        if data.step_id in self.steps:
            raise self._refuse("skip_step", f"step is {self.steps[data.step_id].status}", data.step_id)
        self._trigger(data)

    def record_cache_hit(self, data: ev.StepCacheHit) -> None:
        """The result cache (issue 17) has this released job's output: no job is dispatched."""
        self._require_running("record_cache_hit", compensating_ok=True)
        step = self._step("record_cache_hit", data.step_id, "released")
        if step.step_type != "job" or step.attempt != 0:
            raise self._refuse("record_cache_hit", "only a job not yet dispatched can use a cached output",
                               data.step_id)
        if data.job_hash != step.job_hash:
            raise self._refuse("record_cache_hit", "the cached output is for another job hash", data.step_id)
        self._trigger(data)

    def record_late_result(self, data: ev.LateResultRecorded) -> None:
        step = self._step("record_late_result", data.step_id)
        if data.attempt > step.attempt:
            raise self._refuse("record_late_result", f"attempt {data.attempt} was never dispatched", data.step_id)
        if data.attempt == step.attempt and step.status in ACTIVE_ATTEMPT and not self.terminal:
            raise self._refuse("record_late_result", "the attempt is current", data.step_id)
        self._trigger(data)

    def start_compensation(self, data: ev.CompensationStarted) -> None:
        self._require_running("start_compensation")
        self._trigger(data)

    def finish_compensation(self, data: ev.CompensationFinished) -> None:
        if self.status != "compensating":
            raise self._refuse("finish_compensation", f"run is {self.status}")
        self._trigger(data)

    def succeed(self, data: ev.RunSucceeded) -> None:
        self._require_running("succeed")
        unfinished = [s.step_id for s in self.steps.values() if not s.terminal]
        if unfinished:
            raise self._refuse("succeed", f"steps not finished: {', '.join(sorted(unfinished))}")
        self._trigger(data)

    def fail(self, data: ev.RunFailed) -> None:
        self._require_running("fail", compensating_ok=True)
        self._trigger(data)

    def exceed_budget(self, data: ev.BudgetExceeded) -> None:
        self._require_running("exceed_budget", compensating_ok=True)
        self._trigger(data)

    @property
    def usage(self) -> list[LlmCall]:
        """Every model call of the run so far, step by step."""
        return [call for step in self.steps.values() for call in step.usage]

    def deny(self, data: ev.RunDenied) -> None:
        self._require_running("deny", compensating_ok=True)
        self._trigger(data)

    def cancel(self, data: ev.RunCancelled) -> None:
        if self.terminal:
            raise self._refuse("cancel", f"run is already {self.status}")
        self._trigger(data)

    def time_out(self, data: ev.RunTimedOut) -> None:
        if self.terminal:
            raise self._refuse("time_out", f"run is already {self.status}")
        self._trigger(data)

    # -- a person's interventions (issue 17); the planner appends them on their command --------
    RETRYABLE_STEP: ClassVar[tuple[str, ...]] = ("failed", "timed_out", "retry_wait")
    NOT_SKIPPABLE_STEP: ClassVar[tuple[str, ...]] = ("succeeded", "skipped", "cancelled", "denied", "expanded",
                                                     "awaiting_approval")

    def resume(self, data: ev.RunResumed) -> None:
        """The one way out of a terminal state, and only out of ``failed``: a run that succeeded,
        was cancelled, denied or timed out stays ended, and so does one whose failure was
        compensated (its completed steps were undone)."""
        if self.status != "failed":
            raise self._refuse("resume", f"run is {self.status}; only a failed run can be resumed")
        if self.compensation is not None:
            raise self._refuse("resume", "the run's completed steps were compensated; rerun it instead")
        if not data.steps:
            raise self._refuse("resume", "no failed step to go on from")
        self._trigger(data)

    def retry_step(self, data: ev.StepRetryRequested) -> None:
        self._require_running("retry_step")
        step = self._step("retry_step", data.step_id, *self.RETRYABLE_STEP)
        if step.compensation_of is not None:
            raise self._refuse("retry_step", "a compensation job is not retried by hand", data.step_id)
        if step.item_count is not None:
            raise self._refuse("retry_step", "a for_each step is retried through its items", data.step_id)
        if data.attempt != step.attempt:
            raise self._refuse("retry_step", f"attempt {data.attempt} is not the step's last ({step.attempt})",
                               data.step_id)
        self._trigger(data)

    def supply_output(self, data: ev.StepOutputSupplied) -> None:
        self._require_running("supply_output")
        step = self.steps.get(data.step_id)
        if step is not None:
            if step.status in self.NOT_SKIPPABLE_STEP:
                raise self._refuse("supply_output", f"step is {step.status}", data.step_id)
            if step.step_type == "approval" or step.compensation_of is not None:
                raise self._refuse("supply_output", f"a {'compensation' if step.compensation_of else 'approval'} "
                                   "step cannot be skipped", data.step_id)
        self._trigger(data)

    def pause(self, data: ev.RunPaused) -> None:
        self._require_running("pause", compensating_ok=True)
        if self.paused:
            raise self._refuse("pause", "run is already paused")
        self._trigger(data)

    def unpause(self, data: ev.RunUnpaused) -> None:
        if not self.paused:
            raise self._refuse("unpause", "run is not paused")
        self._require_running("unpause", compensating_ok=True)
        self._trigger(data)

    def give_feedback(self, data: ev.FeedbackGiven) -> None:
        """Feedback is evidence about an output: it may come any time after the output, also
        after the run ended."""
        step = self._step("give_feedback", data.step_id)
        if step.status != "succeeded":
            raise self._refuse("give_feedback", f"step is {step.status}: it has no output to rate", data.step_id)
        self._trigger(data)

    # -- state changes (no rules here: replay must never fail) ---------------------------------
    def _when(self, data: ev.EventData, at: datetime) -> None:
        _STATE_CHANGES[data.type_name](self, data, at)

    def _touch(self, step_id: str, at: datetime) -> StepState:
        step = self.steps[step_id]
        step.updated_at = at
        return step

    def _on_RunStarted(self, d: ev.RunStarted, at: datetime) -> None:
        """State is set by ``__init__`` (eventsourcing calls it for the created event)."""

    def _on_RunAdmitted(self, d: ev.RunAdmitted, at: datetime) -> None:
        self.admission = d

    def _on_StepReady(self, d: ev.StepReady, at: datetime) -> None:
        self.steps[d.step_id] = StepState(
            step_id=d.step_id, status="ready", step_type=d.step_type, topic=d.topic, input=d.input,
            input_ref=d.input_ref, job_hash=d.job_hash, parent_id=d.parent_id,
            compensation_of=d.compensation_of, updated_at=at,
        )

    def _on_StepExpanded(self, d: ev.StepExpanded, at: datetime) -> None:
        self.steps[d.step_id] = StepState(step_id=d.step_id, status="expanded", item_count=d.count,
                                          updated_at=at)

    def _on_PolicyDecided(self, d: ev.PolicyDecided, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        step.decision = d
        if d.decision == "deny":
            step.status = "denied"
        elif d.decision == "require_approval" or step.step_type == "approval":
            step.status = "awaiting_approval"
        else:
            step.status = "released"

    def _on_ApprovalRequested(self, d: ev.ApprovalRequested, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        step.status = "awaiting_approval"
        step.approval = ApprovalState(status="requested", job_hash=d.job_hash, snapshot_id=d.snapshot_id,
                                      approver_role=d.approver_role, expires_at=d.expires_at,
                                      escalate_at=d.escalate_at)

    def _on_ApprovalGranted(self, d: ev.ApprovalGranted, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        assert step.approval is not None
        step.approval.status = "granted"
        step.approval.approver = d.approver
        step.approval.reason = d.reason
        # an approval step is done once granted (a StepSucceeded follows); a gated job is released
        step.status = "released"

    def _on_ApprovalRejected(self, d: ev.ApprovalRejected, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        assert step.approval is not None
        step.approval.status = "rejected"
        step.approval.approver = d.approver
        step.approval.reason = d.reason

    def _on_ApprovalExpired(self, d: ev.ApprovalExpired, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        assert step.approval is not None
        step.approval.status = "expired"

    def _on_ApprovalInvalidated(self, d: ev.ApprovalInvalidated, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        # back to policy: the job is decided again under the snapshot now in force
        step.status = "ready"
        step.decision = None
        step.approval = None

    def _on_ApprovalEscalated(self, d: ev.ApprovalEscalated, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        assert step.approval is not None
        step.approval.approver_role = d.to_role

    def _on_StepDispatched(self, d: ev.StepDispatched, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        step.status = "dispatched"
        step.attempt = d.attempt
        step.job_id = d.job_id
        step.deadline = d.deadline
        step.dispatched_at = at
        step.last_heartbeat_at = None
        step.retry_due_at = None
        step.agent_version = d.agent_version
        step.held = None
        step.throttled = None

    def _on_StepHeld(self, d: ev.StepHeld, at: datetime) -> None:
        """The step keeps its status (released or retry_wait): only the hold is remembered."""
        self._touch(d.step_id, at).held = d

    def _on_StepThrottled(self, d: ev.StepThrottled, at: datetime) -> None:
        self._touch(d.step_id, at).throttled = d.attempt

    def _on_StepHeartbeat(self, d: ev.StepHeartbeat, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        step.status = "running"
        step.last_heartbeat_at = at

    def _on_StepSucceeded(self, d: ev.StepSucceeded, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        step.usage.extend(d.usage)
        step.status = "succeeded"
        step.output = d.output
        step.output_ref = d.output_ref
        step.error = None
        step.guard_hold = None

    def _on_StepFailed(self, d: ev.StepFailed, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        step.usage.extend(d.usage)
        step.error = d.error
        if d.final:
            step.status = "failed"
            step.guard_hold = None

    def _on_RetryScheduled(self, d: ev.RetryScheduled, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        step.status = "retry_wait"
        step.retry_due_at = d.due_at

    def _on_StepTimedOut(self, d: ev.StepTimedOut, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        step.status = "timed_out"
        if d.reason == "heartbeat":
            step.lost_attempts[d.attempt] = step.deadline

    def _on_StepSkipped(self, d: ev.StepSkipped, at: datetime) -> None:
        self.steps[d.step_id] = StepState(step_id=d.step_id, status="skipped", updated_at=at)

    def _on_StepCacheHit(self, d: ev.StepCacheHit, at: datetime) -> None:
        self._touch(d.step_id, at).cache_hit = d

    def _on_BudgetExceeded(self, d: ev.BudgetExceeded, at: datetime) -> None:
        """Evidence: the RunFailed that follows ends the run."""

    def _on_LateResultRecorded(self, d: ev.LateResultRecorded, at: datetime) -> None:
        """Evidence: a stale attempt never changes the step; it has stopped running (#16)."""
        step = self.steps.get(d.step_id)
        if step is not None:
            step.lost_attempts.pop(d.attempt, None)

    def _on_ApprovalRefused(self, d: ev.ApprovalRefused, at: datetime) -> None:
        """Evidence only: a refused decision leaves the request pending."""

    def _on_GuardChecked(self, d: ev.GuardChecked, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        if d.held:  # the output waits for a person; the approval service asks for one
            step.status = "awaiting_approval"
            step.guard_hold = d.approver_role or "approver"
            step.output = d.held_output
            step.output_ref = d.held_output_ref
            step.usage.extend(d.usage)

    def _on_CompensationStarted(self, d: ev.CompensationStarted, at: datetime) -> None:
        self.status = "compensating"
        self.compensation = CompensationState(failed_step=d.failed_step, steps=list(d.steps))

    def _on_CompensationFinished(self, d: ev.CompensationFinished, at: datetime) -> None:
        assert self.compensation is not None
        self.compensation.finished = True
        self.compensation.ok = d.ok
        self.compensation.failed_steps = list(d.failed_steps)

    # -- interventions (issue 17) -------------------------------------------------------------
    def _reopen_parent(self, step: StepState) -> None:
        """An item tried again (or completed by hand) makes its failed for_each parent wait again."""
        parent = self.steps.get(step.parent_id) if step.parent_id else None
        if parent is not None and parent.status == "failed":
            parent.status = "expanded"
            parent.error = None

    def _on_RunResumed(self, d: ev.RunResumed, at: datetime) -> None:
        self.status = "running"
        self.reason = ""
        self.ended_at = None

    def _on_StepRetryRequested(self, d: ev.StepRetryRequested, at: datetime) -> None:
        step = self._touch(d.step_id, at)
        # ready again: policy decides anew, for this job hash; an earlier decision or approval is void
        step.status = "ready"
        if d.patched:
            step.input = d.input
            step.input_ref = d.input_ref
        step.job_hash = d.job_hash
        step.decision = None
        step.approval = None
        step.error = None
        step.retry_due_at = None
        self._reopen_parent(step)

    def _on_StepOutputSupplied(self, d: ev.StepOutputSupplied, at: datetime) -> None:
        step = self.steps.get(d.step_id)
        if step is None:
            step = self.steps[d.step_id] = StepState(step_id=d.step_id, status="succeeded")
        step.updated_at = at
        step.status = "succeeded"
        step.output = d.output
        step.output_ref = d.output_ref
        step.error = None
        self._reopen_parent(step)

    def _on_RunPaused(self, d: ev.RunPaused, at: datetime) -> None:
        self.paused = True

    def _on_RunUnpaused(self, d: ev.RunUnpaused, at: datetime) -> None:
        self.paused = False

    def _on_FeedbackGiven(self, d: ev.FeedbackGiven, at: datetime) -> None:
        """Evidence only: the auditor keeps it for evaluation."""

    def _end(self, status: RunStatus, at: datetime, reason: str = "") -> None:
        self.status = status
        self.reason = reason
        self.ended_at = at

    def _on_RunSucceeded(self, d: ev.RunSucceeded, at: datetime) -> None:
        self.result = d.output
        self._end("succeeded", at)

    def _on_RunFailed(self, d: ev.RunFailed, at: datetime) -> None:
        self._end("failed", at, d.reason)

    def _on_RunDenied(self, d: ev.RunDenied, at: datetime) -> None:
        self._end("denied", at, d.reason)

    def _on_RunCancelled(self, d: ev.RunCancelled, at: datetime) -> None:
        self._end("cancelled", at, d.reason)
        for step in self.steps.values():
            if not step.terminal:
                step.status = "cancelled"

    def _on_RunTimedOut(self, d: ev.RunTimedOut, at: datetime) -> None:
        self._end("timed_out", at, f"run exceeded {d.timeout_ms} ms")


def event_class_name(data_cls: type[ev.EventData]) -> str:
    """The name of the aggregate's event class for an event type: ``Run.StepReady``, and
    ``Run.Started`` (not ``Run.RunStarted``) for the run's own lifecycle.

    The name is part of the class's eventsourcing topic (``interlock.core.run:Run.Started``):
    Interlock's logs store the contract type name, not the topic, but the names stay as they
    always were so that a topic anyone recorded still resolves.
    """
    name = data_cls.type_name
    return name[3:] if name.startswith("Run") and name[3:4].isupper() else name


def _event_classes() -> dict[str, type[Any]]:
    """One aggregate event class per registered event type (contract type name -> class)."""
    classes: dict[str, type[Any]] = {}
    for type_name, data_cls in ev.EVENT_TYPES.items():
        name = event_class_name(data_cls)
        if data_cls is ev.RunStarted:
            event_cls: type[Any] = Run.Started
        elif hasattr(Run, name):
            raise RuntimeError(f"Run.{name} is already defined: no event class for {type_name}")
        else:
            event_cls = type(name, (Run.Event,), {
                "__module__": Run.__module__, "__qualname__": f"{Run.__qualname__}.{name}",
                "__annotations__": {"data": data_cls}, "__doc__": f"The aggregate event of {type_name}.",
            })
            setattr(Run, name, event_cls)
        if event_cls.__qualname__ != f"{Run.__qualname__}.{name}":
            raise RuntimeError(f"{event_cls.__qualname__} should be Run.{name}: its topic would change")
        classes[type_name] = event_cls
    return classes


_StateChange = Callable[[Run, Any, datetime], None]

# how each event type changes a run's state; checked complete against the registry at import
_STATE_CHANGES: dict[str, _StateChange] = ev.complete_table("Run state changes", {
    ev.RunStarted: Run._on_RunStarted,
    ev.RunAdmitted: Run._on_RunAdmitted,
    ev.RunSucceeded: Run._on_RunSucceeded,
    ev.RunFailed: Run._on_RunFailed,
    ev.RunDenied: Run._on_RunDenied,
    ev.RunCancelled: Run._on_RunCancelled,
    ev.RunTimedOut: Run._on_RunTimedOut,
    ev.StepReady: Run._on_StepReady,
    ev.StepExpanded: Run._on_StepExpanded,
    ev.PolicyDecided: Run._on_PolicyDecided,
    ev.ApprovalRequested: Run._on_ApprovalRequested,
    ev.ApprovalGranted: Run._on_ApprovalGranted,
    ev.ApprovalRejected: Run._on_ApprovalRejected,
    ev.ApprovalExpired: Run._on_ApprovalExpired,
    ev.ApprovalInvalidated: Run._on_ApprovalInvalidated,
    ev.ApprovalEscalated: Run._on_ApprovalEscalated,
    ev.StepDispatched: Run._on_StepDispatched,
    ev.StepThrottled: Run._on_StepThrottled,
    ev.StepHeartbeat: Run._on_StepHeartbeat,
    ev.StepHeld: Run._on_StepHeld,
    ev.StepSucceeded: Run._on_StepSucceeded,
    ev.BudgetExceeded: Run._on_BudgetExceeded,
    ev.StepFailed: Run._on_StepFailed,
    ev.RetryScheduled: Run._on_RetryScheduled,
    ev.StepTimedOut: Run._on_StepTimedOut,
    ev.StepSkipped: Run._on_StepSkipped,
    ev.StepCacheHit: Run._on_StepCacheHit,
    ev.LateResultRecorded: Run._on_LateResultRecorded,
    ev.ApprovalRefused: Run._on_ApprovalRefused,
    ev.CompensationStarted: Run._on_CompensationStarted,
    ev.CompensationFinished: Run._on_CompensationFinished,
    ev.RunResumed: Run._on_RunResumed,
    ev.StepRetryRequested: Run._on_StepRetryRequested,
    ev.StepOutputSupplied: Run._on_StepOutputSupplied,
    ev.RunPaused: Run._on_RunPaused,
    ev.RunUnpaused: Run._on_RunUnpaused,
    ev.FeedbackGiven: Run._on_FeedbackGiven,
    ev.GuardChecked: Run._on_GuardChecked,
})
Run.EVENT_CLASSES = _event_classes()
