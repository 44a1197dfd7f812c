"""Run events: the data of every event type, and the envelope they are stored in.

A run's log is the subject ``il.evt.{tenant}.{run_id}``. Each NATS message on it is one
:class:`Commit` of one or more :class:`EventEnvelope` s, appended atomically with optimistic
concurrency. Every envelope carries the hash of its predecessor in the run and its own hash::

    hash = sha256(canonical_json(envelope without "hash"))

where canonical JSON is UTF-8 JSON with object keys sorted and no whitespace.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import Field

from interlock.contracts.messages import JobError, Message, PayloadRef

GENESIS_HASH = "0" * 64

Decision = Literal["allow", "deny", "require_approval"]


class EventData(Message):
    """Base of every event's data.

    ``type_name`` is the event's name in the log (the envelope's ``type``): code names an event
    type by its class (``ev.StepDispatched.type_name``), never by a string.
    """

    type_name: ClassVar[str] = "EventData"

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.type_name = cls.__name__


class StepEventData(EventData):
    step_id: str


# -- run lifecycle -------------------------------------------------------------------------
class RunStarted(EventData):
    workflow_id: str
    workflow_version: str
    definition_hash: str
    input: Any = None
    input_ref: PayloadRef | None = None
    idempotency_key: str
    tenant: str
    requested_by: str = ""
    rerun_of: str | None = None
    reused_outputs: dict[str, Any] = Field(default_factory=dict)


class RunAdmitted(EventData):
    """Policy allowed the run to start (decided on submission, in the same commit as RunStarted)."""

    snapshot_id: str
    rule_ids: list[str] = Field(default_factory=list)


class RunSucceeded(EventData):
    output: Any = None


class RunFailed(EventData):
    reason: str
    step_id: str | None = None
    compensated: bool = False


class RunDenied(EventData):
    step_id: str | None
    reason: str
    rule_ids: list[str] = Field(default_factory=list)
    snapshot_id: str = ""


class RunCancelled(EventData):
    by: str = ""
    reason: str = ""


class RunTimedOut(EventData):
    timeout_ms: int


# -- steps ---------------------------------------------------------------------------------
class StepReady(StepEventData):
    """A step whose dependencies are met, with its resolved input and job hash."""

    step_type: Literal["job", "approval", "notify"] = "job"
    topic: str | None = None
    input: Any = None
    input_ref: PayloadRef | None = None
    job_hash: str
    parent_id: str | None = Field(default=None, description="for_each parent of this item")
    compensation_of: str | None = Field(default=None, description="Step this job compensates")


class StepExpanded(StepEventData):
    """A for_each step expanded into ``count`` item steps ``{step_id}-{index}``."""

    count: int = Field(ge=0)


class PolicyDecided(StepEventData):
    decision: Decision
    step_type: Literal["job", "approval", "notify"] = "job"
    snapshot_id: str
    rule_ids: list[str] = Field(default_factory=list)
    job_hash: str
    reason: str = ""
    approver_role: str | None = None
    approval_expires_ms: int | None = None
    escalate_after_ms: int | None = None
    escalate_to_role: str | None = None
    constraints: dict[str, Any] = Field(default_factory=dict)


class ApprovalRequested(StepEventData):
    job_hash: str
    snapshot_id: str
    approver_role: str
    prompt: str = ""
    expires_at: datetime | None = None
    escalate_at: datetime | None = None
    escalate_to_role: str | None = None


class ApprovalGranted(StepEventData):
    job_hash: str
    approver: str
    role: str
    reason: str = ""


class ApprovalRejected(StepEventData):
    job_hash: str
    approver: str
    role: str
    reason: str = ""


class ApprovalExpired(StepEventData):
    job_hash: str


class ApprovalInvalidated(StepEventData):
    """A pending request no longer holds (the policy changed): the job goes back to policy."""

    job_hash: str
    reason: str
    snapshot_id: str = Field(default="", description="The snapshot now in force")


class ApprovalEscalated(StepEventData):
    """An unanswered request passed to another role."""

    job_hash: str
    from_role: str
    to_role: str


class StepDispatched(StepEventData):
    attempt: int = Field(ge=1)
    job_id: str
    topic: str
    deadline: datetime | None = None


class StepHeartbeat(StepEventData):
    attempt: int = Field(ge=1)
    worker: str = ""
    progress: str | None = None


class StepSucceeded(StepEventData):
    attempt: int = Field(ge=0, description="0 for steps that need no job (approval, notify, fan-out)")
    output: Any = None
    output_ref: PayloadRef | None = None
    worker: str = ""


class StepFailed(StepEventData):
    attempt: int = Field(ge=0)
    error: JobError
    final: bool = Field(description="No further attempt will be made")
    worker: str = ""


class RetryScheduled(StepEventData):
    attempt: int = Field(ge=2, description="The attempt that will run")
    due_at: datetime
    delay_ms: int


class StepTimedOut(StepEventData):
    attempt: int = Field(ge=1)
    reason: Literal["deadline", "heartbeat"] = "deadline"


class StepSkipped(StepEventData):
    reason: str


class LateResultRecorded(StepEventData):
    """A result for an attempt that is no longer current: kept, but it changes nothing."""

    attempt: int
    ok: bool
    worker: str = ""


class CompensationStarted(EventData):
    failed_step: str
    steps: list[str] = Field(description="Steps to compensate, in the order they will run")


class CompensationFinished(EventData):
    ok: bool
    failed_steps: list[str] = Field(default_factory=list)


EVENT_TYPES: dict[str, type[EventData]] = {
    cls.__name__: cls
    for cls in (
        RunStarted,
        RunAdmitted,
        RunSucceeded,
        RunFailed,
        RunDenied,
        RunCancelled,
        RunTimedOut,
        StepReady,
        StepExpanded,
        PolicyDecided,
        ApprovalRequested,
        ApprovalGranted,
        ApprovalRejected,
        ApprovalExpired,
        ApprovalInvalidated,
        ApprovalEscalated,
        StepDispatched,
        StepHeartbeat,
        StepSucceeded,
        StepFailed,
        RetryScheduled,
        StepTimedOut,
        StepSkipped,
        LateResultRecorded,
        CompensationStarted,
        CompensationFinished,
    )
}


def kinds(*types: type[EventData]) -> frozenset[str]:
    """The log names of some event types, for filters such as ``wants=kinds(ev.StepReady)``."""
    return frozenset(t.type_name for t in types)


class EventEnvelope(Message):
    """One event in a run's log."""

    run_id: str
    tenant: str
    seq: int = Field(ge=1, description="Position in the run, 1-based, gap-free")
    type: str = Field(description="One of the event type names")
    at: datetime
    service: str = Field(description="Service (or tool) that appended the event")
    step_id: str | None = None
    attempt: int | None = None
    data: dict[str, Any]
    prev_hash: str = Field(description="hash of the previous event in the run, or 64 zeros")
    hash: str


class Commit(Message):
    """The payload of one message on ``il.evt.{tenant}.{run_id}``: events appended together."""

    run_id: str
    tenant: str
    events: list[EventEnvelope] = Field(min_length=1)
