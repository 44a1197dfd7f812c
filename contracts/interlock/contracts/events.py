"""Run events: the data of every event type, and the envelope they are stored in.

A run's log is the subject ``il.evt.{tenant}.{run_id}``. Each NATS message on it is one
:class:`Commit` of one or more :class:`EventEnvelope` s, appended atomically with optimistic
concurrency. Every envelope carries the hash of its predecessor in the run and its own hash::

    hash = sha256(canonical_json(envelope without "hash"))

where canonical JSON is UTF-8 JSON with object keys sorted and no whitespace.

:data:`EVENT_TYPES` is the one registry of event types: every subclass of :class:`EventData`
that is not a base. The run aggregate's event classes are generated from it; its state changes,
the auditor's row handlers and the timeline text are tables keyed by data class, checked
against it with :func:`complete_table` when their modules are imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, SerializationInfo, SerializerFunctionWrapHandler, model_serializer

from interlock.contracts.messages import JobError, LlmCall, Message, PayloadRef, SignedApproval, SignedPolicyDecision

GENESIS_HASH = "0" * 64

Decision = Literal["allow", "deny", "require_approval"]


class EventData(Message):
    """Base of every event's data.

    ``type_name`` is the event's name in the log (the envelope's ``type``): code names an event
    type by its class (``ev.StepDispatched.type_name``), never by a string.
    """

    type_name: ClassVar[str] = "EventData"
    # a base of event types (set in its class body), not an event type: not in EVENT_TYPES
    is_base: ClassVar[bool] = True
    # fields added to a stored event type later: left out of the stored data while unset, so an
    # event written before them encodes back to the very same bytes (and hash)
    omit_when_none: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.type_name = cls.__name__
        cls.is_base = bool(vars(cls).get("is_base", False))


class StepEventData(EventData):
    """Base of the events about one step."""

    is_base: ClassVar[bool] = True
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
    priority: int | None = Field(default=None, description="The priority the trigger asked for (1-5), if any")
    omit_when_none: ClassVar[frozenset[str]] = frozenset({"priority"})


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

    step_type: Literal["job", "approval", "notify", "guardrail"] = "job"
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
    step_type: Literal["job", "approval", "notify", "guardrail"] = "job"
    snapshot_id: str
    rule_ids: list[str] = Field(default_factory=list)
    job_hash: str
    reason: str = ""
    approver_role: str | None = None
    approval_expires_ms: int | None = None
    escalate_after_ms: int | None = None
    escalate_to_role: str | None = None
    constraints: dict[str, Any] = Field(default_factory=dict)
    signed: SignedPolicyDecision | None = Field(
        default=None, description="The policy service's signed statement of this decision: present when the "
                                  "planner appended it (the decision travelled as a request-reply); absent when "
                                  "the policy service appended it itself")
    omit_when_none: ClassVar[frozenset[str]] = frozenset({"signed"})


class ApprovalRequested(StepEventData):
    job_hash: str
    snapshot_id: str
    approver_role: str
    prompt: str = ""
    expires_at: datetime | None = None
    escalate_at: datetime | None = None
    escalate_to_role: str | None = None


class _Decided(StepEventData):
    """A decision's event: ``via`` is left out of the stored data when empty, so a log written
    before the field existed encodes back to the same bytes (and hashes)."""

    is_base: ClassVar[bool] = True

    @model_serializer(mode="wrap")
    def _omit_empty_via(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        data = handler(self)
        if isinstance(data, dict) and not data.get("via"):
            data.pop("via", None)
        return data


class ApprovalGranted(_Decided):
    omit_when_none: ClassVar[frozenset[str]] = frozenset({"signed"})

    job_hash: str
    approver: str
    role: str
    reason: str = ""
    signed: SignedApproval | None = Field(
        default=None, description="The approver's signed statement of this decision (absent before signing)")
    via: str = Field(default="", description="The channel the decision came through as its sender stated it "
                                             "(\"api\": the HTTP API); empty: NATS directly (the CLI)")


class ApprovalRejected(_Decided):
    omit_when_none: ClassVar[frozenset[str]] = frozenset({"signed"})

    job_hash: str
    approver: str
    role: str
    reason: str = ""
    signed: SignedApproval | None = Field(
        default=None, description="The approver's signed statement of this decision (absent before signing)")
    via: str = Field(default="", description="The channel the decision came through as its sender stated it "
                                             "(\"api\": the HTTP API); empty: NATS directly (the CLI)")


class ApprovalRefused(StepEventData):
    """A decision on a pending request that was refused (the principal lacks the step's role, or
    the decision is for another job hash). Evidence only: the request stays pending."""

    principal: str = Field(description="Who decided: the command subject's principal")
    role: str = Field(description="The role the decision claimed")
    job_hash: str = Field(description="The job hash the decision was for")
    reason: str
    required_role: str = Field(default="", description="The role the request is for")
    decision: Literal["approve", "reject"] = "approve"


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
    # the routing decision (issue 16), empty for a job any worker of the topic may take
    agent_version: str = Field(default="", exclude_if=lambda v: not v, description=(
        "The agent version the job was sent to (its versioned subject), '' for any worker of the topic"))
    route: str = Field(default="", exclude_if=lambda v: not v, description=(
        "Why that version: 'canary' or 'stable' (a rollout), 'range' (the step's agent_version)"))


class StepHeld(StepEventData):
    """The dispatcher held a released job back (it stays released and is dispatched later): the
    circuit breaker of its topic is open, or no live worker runs an agent version it may go to.
    Written once per hold, not on every re-check. Consumed by nobody but the dispatcher itself
    (which re-checks on a ``breaker`` timer), the auditor and the timeline."""

    attempt: int = Field(ge=1, description="The attempt that waits")
    topic: str
    reason: Literal["breaker_open", "breaker_probing", "no_agent_version"]
    until: datetime | None = Field(default=None, description="When the dispatcher looks again")
    breaker_opened_at: datetime | None = Field(default=None, description="The opening of the breaker that holds it")
    message: str = ""


class StepThrottled(StepEventData):
    """A released job (or a due retry) waits: a workload limit is reached. It is dispatched, in
    priority and fair-share order, when a slot frees or the rate allows (a StepDispatched follows).
    Written once per attempt, by the dispatcher (the only service that consumes it)."""

    attempt: int = Field(ge=1, description="The attempt that waits to be dispatched")
    scope: str = Field(description="The limit that holds it: concurrency.topic.llm, rate.tenant.acme, backpressure…")
    reason: str = ""
    priority: int = 3


class StepHeartbeat(StepEventData):
    attempt: int = Field(ge=1)
    worker: str = ""
    progress: str | None = None


def _empty(value: Any) -> bool:
    """A field added after logs were written is left out of the stored form while it is empty,
    so an older event re-encodes (and hashes) exactly as it was written."""
    return not value


class StepSucceeded(StepEventData):
    attempt: int = Field(ge=0, description="0 for steps that need no job (approval, notify, fan-out)")
    output: Any = None
    output_ref: PayloadRef | None = None
    worker: str = ""
    usage: list[LlmCall] = Field(default_factory=list, exclude_if=_empty, description="Model calls the attempt made")


class StepFailed(StepEventData):
    attempt: int = Field(ge=0)
    error: JobError
    final: bool = Field(description="No further attempt will be made")
    worker: str = ""
    usage: list[LlmCall] = Field(default_factory=list, exclude_if=_empty, description="Model calls the attempt made")


class GuardFinding(Message):
    """One thing a guard check found: its kind and where, never the matched text itself."""

    kind: str = Field(description="What was found: 'AWS Access Key', 'email', 'iban', 'deny:RULE', "
                                  "'injection:PATTERN', 'schema'…")
    path: str = Field(description="Where in the checked value: output.text, output.items[2]")
    start: int | None = Field(default=None, description="Offset of the match in that string (characters)")
    end: int | None = Field(default=None, description="End offset of the match (exclusive)")
    detail: str = Field(default="", description="A schema error's message (never for text matches)")


class GuardChecked(StepEventData):
    """The verdict of one guard check on a step's output (a job step's ``guard:``) or on the
    value a ``type: guardrail`` step checks, and what the step does about a violation.

    Written by the dispatcher, before the step's outcome (in the same commit). ``action``
    ``approve`` holds the (redacted where secret) value for a person: the step waits for
    approval, and the approval service asks for one (it consumes these events)."""

    attempt: int = Field(ge=0, description="The job attempt checked (0 for a guardrail step)")
    check: Literal["schema", "content", "secrets", "pii", "injection"]
    verdict: Literal["pass", "violation"]
    findings: list[GuardFinding] = Field(default_factory=list)
    action: Literal["none", "fail", "approve", "redact"] = "none"
    held: bool = Field(default=False, description="This event carries the output held for approval")
    held_output: Any = None
    held_output_ref: PayloadRef | None = None
    approver_role: str | None = Field(default=None, description="Who may release a held output")
    usage: list[LlmCall] = Field(default_factory=list, exclude_if=_empty,
                                 description="A held attempt's model calls (its success, later, carries none)")


class BudgetExceeded(EventData):
    """Model spend went over a budget (the run's, from its workflow, or its tenant's over a time
    window, from the planner's settings): the run ends (RunFailed follows)."""

    scope: Literal["run", "tenant"] = "run"
    limit: str = Field(description="The limit crossed: max_cost_usd or max_tokens")
    allowed: float
    spent: float


class RetryScheduled(StepEventData):
    attempt: int = Field(ge=2, description="The attempt that will run")
    due_at: datetime
    delay_ms: int


class StepTimedOut(StepEventData):
    attempt: int = Field(ge=1)
    reason: Literal["deadline", "heartbeat"] = "deadline"


class StepCacheHit(StepEventData):
    """A released job's output was taken from the result cache (its step's ``cache:``): an earlier
    successful job with the same cache key and job hash, in the same tenant. No job is dispatched;
    the StepSucceeded (attempt 0, worker ``cache``) that uses the output follows in the same commit.
    Written by the dispatcher, after the step's allow decision (and approval) is durable; consumed
    by nobody but the auditor's projection and the timeline (the planner acts on the StepSucceeded)."""

    job_hash: str
    cache_key: str = Field(description="sha256 hex digest of the rendered cache key (never the key itself)")
    source_run_id: str = Field(description="The run whose job produced the output")
    source_step_id: str = Field(description="The step of that run")
    source_at: datetime | None = Field(default=None, description="When the source job succeeded")
    expires_at: datetime | None = Field(default=None, description="When the cache entry expires")


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


# -- operator interventions and feedback (issue 17) ----------------------------------------
# Written by the planner when a person asks (commands il.cmd.{tenant}.{retry,skip,resume,pause,
# unpause,feedback}.{principal}); ``by`` is the command subject's principal, ``via`` the surface
# (cli, api:<key id>), ``reason`` why. Who consumes which:
#   RunResumed, StepRetryRequested, StepOutputSupplied -> planner (plans on), auditor
#   StepRetryRequested -> policy (decides the step again, for its new job hash)
#   RunPaused, RunUnpaused -> dispatcher (holds / releases dispatching), auditor
#   FeedbackGiven -> auditor only (its feedback table; evidence for the run)
class _Intervention(EventData):
    is_base: ClassVar[bool] = True

    by: str = Field(description="The principal who asked (the command subject's)")
    via: str = Field(default="cli", description="How: cli, or api:<key id>")
    reason: str = Field(description="Why, as the person gave it")


class RunResumed(_Intervention):
    """A failed run goes on from its failed steps (the same run id): the one way a terminal run
    becomes running again, and only from ``failed`` (not compensated). Each step in ``steps``
    is retried by a StepRetryRequested in the same commit."""

    steps: list[str] = Field(description="The failed steps retried")


class StepRetryRequested(_Intervention, StepEventData):
    """A failed, timed-out or waiting step is tried again now: it is ready again under
    ``job_hash`` (policy decides again; an earlier decision or approval no longer counts)."""

    attempt: int = Field(ge=0, description="The step's last attempt so far (the retry dispatches attempt + 1)")
    patched: bool = Field(default=False, description="The person supplied a new input (``input``)")
    input: Any = Field(default=None, description="The input the retry runs with (the patch, when patched)")
    input_ref: PayloadRef | None = None
    job_hash: str = Field(description="The job hash of the retried job (recomputed from a patched input)")
    previous_job_hash: str = ""


class StepOutputSupplied(_Intervention, StepEventData):
    """A person completed the step with ``output`` (``step skip``): it counts as succeeded, so
    its dependants proceed; a result of an attempt still out is then late."""

    output: Any = None
    output_ref: PayloadRef | None = None
    output_hash: str = Field(description="sha256 of the canonical JSON of the output")
    previous_status: str = ""


class RunPaused(_Intervention):
    """Nothing new is dispatched until RunUnpaused; jobs already out finish."""


class RunUnpaused(_Intervention):
    """Dispatching goes on."""


class FeedbackGiven(StepEventData):
    """A person's rating or correction of a step's output, bound to the output's hash."""

    by: str
    via: str = "cli"
    output_hash: str = Field(description="sha256 of the canonical JSON of the output it is about")
    attempt: int = Field(default=0, ge=0, description="The attempt that produced the output (0: none)")
    score: float | None = None
    correction: Any = Field(default=None, description="The output as it should have been (null: none)")
    note: str = ""


def _event_types() -> dict[str, type[EventData]]:
    """Every event type by name: the subclasses of EventData that are not bases."""
    types: dict[str, type[EventData]] = {}

    def visit(cls: type[EventData]) -> None:
        for sub in cls.__subclasses__():
            if not sub.is_base and types.setdefault(sub.type_name, sub) is not sub:
                raise RuntimeError(f"two event types are named {sub.type_name!r}: "
                                   f"{types[sub.type_name].__module__} and {sub.__module__}")
            visit(sub)

    visit(EventData)
    return types


#: The registry: every event type's name (the envelope's ``type``) and data class. Everything
#: that must handle every event type is a table keyed by data class checked against it with
#: :func:`complete_table`.
EVENT_TYPES: Mapping[str, type[EventData]] = MappingProxyType(_event_types())

_H = TypeVar("_H")


def complete_table(what: str, table: Mapping[type[EventData], _H],
                   types: Mapping[str, type[EventData]] | None = None) -> dict[str, _H]:
    """``table`` keyed by type name, once it is checked to hold exactly one entry per event type.

    For the tables derived from the registry (the run aggregate's state changes, the auditor's
    rows, the timeline text): an event type added without its entry fails at import with a
    RuntimeError that names it and ``what`` lacks it. ``types`` defaults to :data:`EVENT_TYPES`
    (read when called, so a test can add a type).
    """
    types = EVENT_TYPES if types is None else types
    missing = sorted(name for name, cls in types.items() if cls not in table)
    unknown = sorted(cls.__qualname__ for cls in table if types.get(cls.type_name) is not cls)
    if missing or unknown:
        parts = [f"no entry for {', '.join(missing)}"] if missing else []
        parts += [f"entries for {', '.join(unknown)}, which are not event types"] if unknown else []
        raise RuntimeError(f"{what}: {'; '.join(parts)}")
    return {name: table[cls] for name, cls in types.items()}


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
