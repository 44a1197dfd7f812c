"""Messages that travel on Interlock's subjects (everything except run events, see ``events``).

Evolution rules: every field added later has a default; decoding ignores unknown fields, so an
older service reads a newer message. Field names are snake_case JSON.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TENANT = "default"


class Message(BaseModel):
    """Base of every contract: unknown fields tolerated, instances immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class PayloadRef(Message):
    """A large payload kept in the object store instead of inline."""

    object_store: str = Field(description="Object store bucket name")
    key: str = Field(description="Object name (the sha256 of the content)")
    sha256: str
    size: int


PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 1, 5, 3
"""Run priorities: 1 is the lowest, 5 the highest; a run that names none has the workflow's, else 3."""


class Trigger(Message):
    """Starts a run. The same (tenant, workflow_id, idempotency_key) never starts two runs."""

    workflow_id: str
    workflow_version: str | None = Field(default=None, description="Pinned version; latest if omitted")
    input: Any = None
    idempotency_key: str = Field(min_length=1, max_length=256)
    tenant: str | None = Field(
        default=None, description="Deprecated, ignored: the run's tenant is the trigger subject's. A trigger "
                                  "whose tenant differs from the subject's is dead-lettered.")
    requested_by: str = ""
    rerun_of: str | None = Field(default=None, description="Run id this run re-runs")
    reuse_outputs: dict[str, Any] = Field(
        default_factory=dict, description="Step outputs copied from the re-run run (step id -> output)"
    )
    priority: int | None = Field(default=None, ge=PRIORITY_MIN, le=PRIORITY_MAX, description=(
        "The run's priority, 1 (lowest) to 5 (highest): when a topic is saturated its jobs are handed out "
        "first. Default: the workflow's priority, else 3"))


class Job(Message):
    """A unit of work for an agent worker, published on ``il.job.{tenant}.{topic}``."""

    job_id: str = Field(description="run_id:step_id@attempt")
    run_id: str
    tenant: str
    workflow_id: str
    step_id: str
    topic: str
    attempt: int = Field(ge=1)
    idempotency_key: str = Field(description="Stable across attempts: run_id:step_id")
    input: Any = Field(default=None, description=(
        "The step's input: any JSON value (object, array, string, number, boolean or null). null when the "
        "step has no input, and when the input travels as input_ref instead"))
    input_ref: PayloadRef | None = Field(default=None, description=(
        "Set instead of input when the input is larger than the inline limit: the input is the JSON stored "
        "in the object store under this reference (check its sha256)"))
    deadline: datetime | None = Field(default=None, description=(
        "When this attempt times out (RFC 3339, UTC). A worker still working then stops and reports "
        "ok=false with error.kind 'timeout' (retryable)"))
    heartbeat_interval_ms: int = Field(default=2000, description=(
        "How often the worker sends a Heartbeat while it works on the job, in ms (the dispatcher derives it "
        "from the step's lease; read it from each job)"))
    job_hash: str
    constraints: dict[str, Any] = Field(default_factory=dict, description="Handed on by policy")
    trace_parent: str | None = None
    sensitive_output: list[str] = Field(
        default_factory=list, description="Paths in the output (output.token) to seal, besides keys named by the "
                                          "sensitive key patterns; see contracts/README.md, Sensitive values")
    record_prompts: bool = Field(False, description="The workflow lets the worker keep prompts in LlmCall.prompt")
    agent_version: str = Field("", description=(
        "Set on a job routed to one agent version (subject il.vjob.{tenant}.{version}.{topic}); '' for any worker"))


class JobError(Message):
    """Why an attempt failed."""

    message: str
    retryable: bool = Field(default=True, description="false: fail the step now, no further attempts")
    kind: str = Field(default="error", description=(
        "Free text; 'timeout' (the worker stopped at the job's deadline) is recorded as a timed-out attempt"))


class LlmCall(Message):
    """One model call an agent made for a job (``ctx.record_llm``), named after the OpenTelemetry
    GenAI conventions (``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.usage.*``)."""

    provider: str = Field(description="gen_ai.provider.name, e.g. openai, anthropic")
    model: str = Field(description="gen_ai.request.model")
    operation: str = Field("chat", description="gen_ai.operation.name")
    input_tokens: int = Field(0, ge=0, description="gen_ai.usage.input_tokens")
    output_tokens: int = Field(0, ge=0, description="gen_ai.usage.output_tokens")
    cost_usd: float = Field(0.0, ge=0, description="What the call cost, in US dollars")
    temperature: float | None = Field(None, description="gen_ai.request.temperature")
    prompt_ref: str | None = Field(None, description="Where the prompt is kept (a template id, a hash)")
    prompt: str | None = Field(None, description="The prompt itself, only when the workflow sets record_prompts")


class JobResult(Message):
    """What a worker reports for one attempt, published on ``il.result.{tenant}.{run_id}``."""

    job_id: str
    run_id: str
    tenant: str
    step_id: str
    attempt: int = Field(ge=1)
    ok: bool
    output: Any = Field(default=None, description=(
        "With ok=true: the step's output, any JSON value; null (or omitted) is a valid output. Ignored when "
        "output_ref is set, and with ok=false"))
    output_ref: PayloadRef | None = Field(default=None, description=(
        "With ok=true, instead of output when the output's canonical JSON is larger than the inline limit: "
        "where it is stored in the object store"))
    error: JobError | None = Field(default=None, description="With ok=false: what went wrong")
    worker: str = Field(default="", description="The reporting worker's worker_id (as in its AgentRegistration)")
    usage: list[LlmCall] = Field(default_factory=list, description="Model calls made for this attempt")


class Heartbeat(Message):
    """Sent by a worker while a job runs, on ``il.hb.{tenant}.{run_id}``."""

    job_id: str
    run_id: str
    tenant: str
    step_id: str
    attempt: int = Field(ge=1)
    worker: str = Field(default="", description="The worker's worker_id (as in its AgentRegistration)")
    progress: str | None = Field(default=None, description="Free text shown in the run's timeline")


class Notification(Message):
    """Published by a notify step on ``il.notify.{tenant}.{channel}``."""

    run_id: str
    tenant: str
    workflow_id: str
    step_id: str
    channel: str
    message: str
    data: Any = None


class Alert(Message):
    """An alert raised or resolved by the auditor, on ``il.notify.{tenant}.alerts``.

    An alert's history is its messages with the same ``alert_id``, in stream order: ``firing``,
    then ``resolved`` (and firing again if the condition returns)."""

    alert_id: str = Field(description="Stable per condition: rule and what it is about (run, step, topic)")
    rule: str = Field(description="sla_run, sla_step, approval_waiting, retry_rate, denial_rate, "
                                  "dead_letter_growth or latency_drift")
    state: Literal["firing", "resolved"]
    severity: Literal["warning", "critical"] = "warning"
    tenant: str
    workflow_id: str | None = None
    run_id: str | None = None
    step_id: str | None = None
    topic: str | None = None
    summary: str = Field(description="What is wrong, in one line")
    context: dict[str, Any] = Field(default_factory=dict, description="The figures behind it")
    first_fix: str = Field("", description="Where to look first")
    at: datetime


class CancelNotice(Message):
    """Tells running workers of a run that it was cancelled."""

    run_id: str
    tenant: str
    reason: str = ""


class TimerFired(Message):
    """A durable timer's payload; it fires on ``il.timer.fire.{kind}`` at its due time."""

    kind: Literal["retry", "deadline", "lease", "approval_expiry", "approval_escalation", "run_timeout", "breaker",
                  "gate"]
    run_id: str
    tenant: str
    step_id: str | None = None
    attempt: int | None = None
    due_at: datetime


class ScheduleTimer(Message):
    """A workflow schedule's next tick, on ``il.timer.at.schedule.{tenant}.{workflow_id}``; it fires on
    ``il.timer.fire.schedule`` at ``tick``, where the planner starts the tick's run (idempotency key
    ``schedule:{tick}``, so a tick never starts two runs) and schedules the tick after it."""

    tenant: str = Field(description="The tenant whose runs the schedule starts")
    workflow_id: str
    workflow_version: str = Field(description="The version whose schedule this is (the latest when it was set)")
    schedule_hash: str = Field(description="sha256 of the schedule as defined: a tick of a schedule that has "
                                           "changed since is dropped (the new schedule has its own)")
    tick: datetime = Field(description="The tick (UTC): when it is due, and what the run's input names")
    cancelled: bool = Field(default=False, description="Published without a schedule header when a workflow's "
                                                       "schedule is removed: replaces the pending tick, so it "
                                                       "never fires")


class GateHolder(Message):
    """A job that holds a slot of a concurrency limit (from before its StepDispatched until after
    its outcome is durable)."""

    tenant: str
    run_id: str
    step_id: str
    at: float = Field(description="When it took the slot (Unix seconds)")


class GateWaiter(Message):
    """A job that waits for a slot or a token (its StepThrottled is in the run's log)."""

    tenant: str
    run_id: str
    step_id: str
    priority: int = PRIORITY_DEFAULT
    since: float = Field(description="When it began to wait (Unix seconds): first come, first served")


class GateScope(Message):
    """One workload limit's state in bucket il_gate, changed only with compare-and-set."""

    holders: dict[str, GateHolder] = Field(default_factory=dict, description="job id -> the slot it holds")
    waiting: dict[str, GateWaiter] = Field(default_factory=dict, description="job id -> the job that waits")
    tokens: float | None = Field(default=None, description="A rate limit's tokens at refilled_at")
    refilled_at: float | None = None
    shares: dict[str, float] = Field(default_factory=dict, description=(
        "tenant -> slots handed out per unit of weight (fair share's virtual time; a tenant that starts "
        "waiting starts at the least share of those already there)"))


class AgentRegistration(Message):
    """An agent worker's entry in the agent registry."""

    worker_id: str = Field(description=(
        "One subject token (letters, digits, '_' and '-'), unique per worker process and stable while it runs "
        "(the SDK: '{name}-{hostname}-{pid}'); the same value goes into the worker field of its heartbeats "
        "and results"))
    topic: str
    tenant: str = Field(default=DEFAULT_TENANT, description="The tenant whose jobs the worker takes")
    version: str = "0"
    capabilities: list[str] = Field(default_factory=list)
    host: str = ""
    pid: int = 0
    started_at: datetime
    last_heartbeat: datetime


class ApprovalStatement(Message):
    """A person's approval decision as they signed it (the ``statement`` of an approval event)."""

    domain: Literal["interlock.approval.v1"] = "interlock.approval.v1"
    tenant: str
    run_id: str
    step_id: str
    job_hash: str
    snapshot_id: str = Field(description="The policy snapshot the request was made under")
    decision: Literal["approve", "reject"]
    principal: str = Field(description="Who decides (the principal of the key that signs)")
    role: str = Field(description="The approver role the decision is made in")
    reason: str = ""
    at: str = Field(description="When it was signed, RFC 3339 UTC")
    via: str = Field(default="cli", description="How it was given: cli, api:<api key id>, …")


class SignedApproval(Message):
    """An approval statement with the approver's Ed25519 signature (base64url) and key id."""

    statement: ApprovalStatement
    key_id: str = Field(description="The approver's nkey public key (U…)")
    signature: str = Field(description="base64url (no padding) Ed25519 signature of canonical(statement)")


StepKind = Literal["job", "approval", "notify", "guardrail"]


class PolicyStatement(Message):
    """The policy service's decision on one ready step as it signed it (the ``statement`` of a
    PolicyDecided the planner appends, :class:`SignedPolicyDecision`): every field of the
    decision, bound to the run and tenant. A PolicyDecided written by the planner is trusted only
    when its data equals this statement (``authorship.policy_mismatch``) and the signature is a
    policy service key's (contracts/README.md, "Signed commits")."""

    domain: Literal["interlock.policy.v1"] = "interlock.policy.v1"
    tenant: str
    run_id: str
    step_id: str
    job_hash: str
    decision: Literal["allow", "deny", "require_approval"]
    step_type: StepKind = "job"
    snapshot_id: str
    rule_ids: list[str] = Field(default_factory=list)
    reason: str = ""
    approver_role: str | None = None
    approval_expires_ms: int | None = None
    escalate_after_ms: int | None = None
    escalate_to_role: str | None = None
    constraints: dict[str, Any] = Field(default_factory=dict)
    at: str = Field(description="When it was decided and signed, RFC 3339 UTC")


class SignedPolicyDecision(Message):
    """A policy statement with the deciding policy service's Ed25519 signature (base64url) and key id."""

    statement: PolicyStatement
    key_id: str = Field(default="", description="The policy service instance's nkey public key (U…); empty "
                                                "only when signing is off (INTERLOCK_SIGNING=off)")
    signature: str = Field(default="", description="base64url (no padding) Ed25519 signature of "
                                                   "canonical(statement); empty only when signing is off")


class PolicyStep(Message):
    """One ready step to decide: what its StepReady records."""

    step_id: str
    step_type: StepKind = "job"
    topic: str | None = None
    input: Any = None
    input_ref: PayloadRef | None = None
    job_hash: str = Field(description="The StepReady's job hash; the policy service recomputes it from the "
                                      "input and refuses a request whose hash does not match")


class PolicyRequest(Message):
    """The planner asks the policy service to decide steps of a run that are ready now (request
    ``il.policy.decide.{tenant}``), so the decisions land in the same commit as the StepReady events."""

    run_id: str
    workflow_id: str
    workflow_version: str
    steps: list[PolicyStep] = Field(default_factory=list)
    expires_at_ms: int | None = Field(
        default=None, description="Unix milliseconds after which the planner no longer waits for the answer: "
                                  "the policy service then refuses at once instead of deciding (the steps go "
                                  "the consumer path, and deciding them here too would be wasted)")


class PolicyReply(Message):
    """The decisions, one per requested step in order, each signed by the policy service; or why not
    (``ok`` false: the planner appends the StepReady events alone, the policy service decides them
    from its consumer)."""

    ok: bool
    error: str = ""
    decisions: list[SignedPolicyDecision] = Field(default_factory=list)


class ApprovalDecision(Message):
    """A person's decision on a pending approval (command ``il.cmd.{tenant}.approve.{principal}`` /
    ``…reject…``): the run's tenant and the approver are the subject's."""

    run_id: str
    tenant: str | None = Field(
        default=None, description="Deprecated, ignored: the tenant is the command subject's. A decision whose "
                                  "tenant differs from the subject's is refused.")
    step_id: str
    job_hash: str = Field(description="The hash of the job being approved, as shown in the request")
    approver: str | None = Field(
        default=None, description="Deprecated, ignored: the approver is the command subject's principal. A "
                                  "decision naming another approver is refused.")
    role: str
    reason: str = ""
    signed: SignedApproval | None = Field(
        default=None, description="The decision as the approver signed it (required while signing is on): "
                                  "its statement must say the same run, step, job hash, role and decision")
    via: str = Field(default="", description="The channel the decision came through, as the sender states it "
                                             "(\"api\": the HTTP API, for an API key's principal); recorded in "
                                             "the decision's event")


class CancelRequest(Message):
    """Cancel a run (command ``il.cmd.{tenant}.cancel.{principal}``): the run's tenant and who cancelled
    are the subject's."""

    run_id: str
    tenant: str | None = Field(
        default=None, description="Deprecated, ignored: the tenant is the command subject's. A request whose "
                                  "tenant differs from the subject's is refused.")
    by: str | None = Field(
        default=None, description="Deprecated, ignored: who cancels is the command subject's principal. A "
                                  "request naming someone else is refused.")
    reason: str = ""


class Intervention(Message):
    """Base of a person's act on a run (issue 17): the run's tenant and who acts are the command
    subject's; ``reason`` (required) and ``via`` are recorded with the act's event."""

    run_id: str
    reason: str = Field(min_length=1, max_length=2000, description="Why (required): recorded in the run's log")
    via: str = Field(default="cli", max_length=200, description="How the act came: cli, or api:<key id>")


class RetryStepRequest(Intervention):
    """Retry a failed, timed-out or waiting step now (command ``il.cmd.{tenant}.retry.{principal}``)."""

    step_id: str
    patched: bool = Field(default=False, description="Run the retry with ``input`` instead of the step's input")
    input: Any = Field(default=None, description="The new input (when ``patched``): its job hash is recomputed, "
                                                 "so policy and approvals decide again for it")


class SkipStepRequest(Intervention):
    """Complete a step with a supplied output (command ``il.cmd.{tenant}.skip.{principal}``)."""

    step_id: str
    output: Any = None


class RunControlRequest(Intervention):
    """Resume a failed run, or pause / unpause dispatching of a running one (commands
    ``il.cmd.{tenant}.{resume,pause,unpause}.{principal}``)."""


class FeedbackRequest(Message):
    """Rate or correct a step's output (command ``il.cmd.{tenant}.feedback.{principal}``): at least
    one of ``score``, ``correction`` (``has_correction``) and ``note``."""

    run_id: str
    step_id: str
    score: float | None = Field(default=None, description="A rating of the output (a finite number)")
    has_correction: bool = Field(default=False, description="``correction`` is given (it may be null)")
    correction: Any = None
    note: str = Field(default="", max_length=10_000)
    output_hash: str | None = Field(default=None, description="The output the feedback is about, when the "
                                                              "sender knows it: refused if the step's differs")
    via: str = Field(default="cli", max_length=200)


class ApiKeyRecord(Message):
    """An HTTP API key as stored in ``il_apikeys`` (key: ``key_id``): who it is and what it may do.
    The key itself is never stored, only its SHA-256."""

    key_id: str = Field(description="The key's public id (the second part of the key)")
    tenant: str
    role: str = Field(description="viewer, operator, approver, policy-admin or admin")
    principal: str = Field(description="Who the key acts as: approvals and cancels are attributed to this name")
    sha256: str = Field(description="SHA-256 of the whole key, hex")
    created_at: datetime
    created_by: str = ""
    revoked_at: datetime | None = None
    revoked_by: str = ""
    signer_key_id: str | None = Field(default=None, description="The nkey public key the API signs this key's "
                                                                "approvals with (in the keyring as its principal's)")
    signer_sealed: str | None = Field(default=None, description="That key's seed, AES-GCM under a key derived "
                                                                "from the API key itself (base64: nonce + ciphertext)")


class CommandReply(Message):
    ok: bool
    error: str | None = None
    detail: Any = None


class DeadLetter(Message):
    """A message a service could not process, kept with the reason and its original bytes."""

    service: str
    subject: str
    reason: str
    data_b64: str = Field(description="The original payload, base64; only its first bytes when ``truncated``")
    headers: dict[str, str] = Field(default_factory=dict)
    at: datetime
    size: int | None = Field(default=None, description="The original payload's size in bytes")
    sha256: str | None = Field(default=None, description="The original payload's SHA-256, hex")
    truncated: bool = Field(default=False, description="``data_b64`` holds a bounded prefix of a larger original "
                                                       "(a whole copy would exceed the stream's message size)")


class DeadLetterAction(Message):
    """One thing done about a dead letter: marked resolved, or its original published again."""

    action: Literal["resolved", "replayed"]
    by: str = Field(description="The principal who did it")
    at: datetime
    note: str = ""
    msg_id: str | None = Field(default=None, description="replayed: the new Nats-Msg-Id of the republished original")
    subject: str | None = Field(default=None, description="replayed: where the original was published again")
    stream_seq: int | None = Field(default=None, description="replayed: the stream sequence the republished "
                                                             "original got")


class DeadLetterStatus(Message):
    """What was done about the dead letter with stream sequence ``seq`` in ``IL_DLQ`` (bucket
    ``il_dlq_status``, key ``{seq}``). The dead letter itself is never deleted; a dead letter without
    an entry is open. ``status`` is the last action's."""

    seq: int
    status: Literal["resolved", "replayed"]
    actions: list[DeadLetterAction] = Field(default_factory=list, description="Every action, oldest first")


class BreakerOutcome(Message):
    """One job outcome a circuit breaker counted."""

    job_id: str
    ok: bool
    at: datetime


class BreakerState(Message):
    """The circuit breaker of one tenant's jobs of one topic (bucket ``il_breakers``, key
    ``state.{tenant}.{topic}``), updated by the dispatchers with compare-and-set."""

    tenant: str
    topic: str
    state: Literal["closed", "open", "half_open"] = "closed"
    consecutive_failures: int = 0
    recent: list[BreakerOutcome] = Field(default_factory=list, description=(
        "Outcomes inside the failure-rate window, oldest first (bounded); their job ids make counting idempotent"))
    opened_at: datetime | None = Field(default=None, description="When it last opened")
    retry_at: datetime | None = Field(default=None, description="Open: when the cooldown ends and a probe may go")
    probe_job: str | None = Field(default=None, description="Half-open: the one job let through to test the topic")
    probe_started_at: datetime | None = None
    changed_at: datetime | None = None
    reason: str = Field(default="", description="Why it last changed state")
    transitions: int = Field(default=0, description="State changes so far (the change log's sequence)")
    last_change: BreakerChange | None = Field(default=None, description="The latest state change (also in the log)")


class BreakerChange(Message):
    """One state change of a breaker: the revisions of key ``log.{tenant}.{topic}`` are its log."""

    tenant: str
    topic: str
    seq: int
    from_state: str
    to_state: str
    at: datetime
    reason: str = ""
    by: str = Field(default="", description="The dispatcher instance that changed it")


class RolloutStats(Message):
    """What one side of a rollout (stable or canary) did."""

    version: str
    jobs: int = 0
    failures: int = 0
    latency_ms: list[float] = Field(default_factory=list, description="Recent job latencies (dispatch to result)")
    job_ids: list[str] = Field(default_factory=list, description="Recent job ids counted (idempotent counting)")

    @property
    def failure_rate(self) -> float:
        return self.failures / self.jobs if self.jobs else 0.0


class Rollout(Message):
    """A canary rollout of one tenant's agents of one topic (bucket ``il_rollouts``, key
    ``{tenant}.{topic}``): ``share`` of the jobs go to version ``canary``, the rest to ``stable``,
    until the dispatcher promotes or rolls it back (or an operator aborts it)."""

    tenant: str
    topic: str
    stable: str
    canary: str
    share: float = Field(ge=0.0, le=1.0, description="Share of the jobs sent to the canary")
    status: Literal["active", "promoted", "rolled_back", "aborted"] = "active"
    started_at: datetime
    started_by: str = ""
    window_s: float = Field(default=300.0, ge=0, description="Promote once this long has passed (and min_jobs ran)")
    min_jobs: int = Field(default=20, ge=1, description="Canary jobs needed before any verdict")
    max_failure_delta: float = Field(default=0.05, ge=0.0, description=(
        "Roll back when the canary's failure rate exceeds the stable one's by more than this"))
    max_latency_ratio: float = Field(default=1.5, ge=0.0, description=(
        "Roll back when the canary's median latency exceeds the stable one's times this"))
    canary_stats: RolloutStats
    stable_stats: RolloutStats
    decided_at: datetime | None = None
    decided_by: str = ""
    reason: str = ""

    @property
    def routing_version(self) -> str | None:
        """The one version every job goes to once the rollout ended (None while it is active)."""
        if self.status == "promoted":
            return self.canary
        return None if self.status == "active" else self.stable


class SealHead(Message):
    """Where one run's log ended when it was sealed."""

    subject: str = Field(description="The run's subject, il.evt.{tenant}.{run_id}")
    stream_seq: int = Field(ge=1, description="Stream sequence of the run's last commit")
    seq: int = Field(ge=1, description="seq of the run's last event")
    hash: str = Field(description="hash of the run's last event (its chain head)")


class Seal(Message):
    """The auditor's signed statement of how far a stream went (see contracts/README.md, "Seals").

    ``signature`` is Ed25519 by ``signer`` (an nkey public key) over the canonical JSON of every
    other field; the next seal's ``prev`` is the SHA-256 (hex) of those same bytes."""

    v: Literal[1] = 1
    number: int = Field(ge=1, description="Position in the chain, 1 for the first seal")
    stream: str = Field(description="The sealed stream (IL_EVENTS)")
    created: str = Field(description="The stream's creation time as the server reports it: a re-created stream "
                                     "has another")
    first_seq: int = Field(ge=0, description="The stream's first sequence when sealed")
    last_seq: int = Field(ge=0, description="The stream's last sequence when sealed: the seal point")
    messages: int = Field(ge=0, description="Messages the stream held in first_seq..last_seq")
    runs: int = Field(ge=0, description="Run subjects with at least one message up to last_seq")
    heads_root: str = Field(description="RFC 6962 Merkle root (hex) of every run's head, sorted by subject")
    heads: list[SealHead] = Field(description="The heads that changed since the previous seal (every head in "
                                              "seal 1)")
    sealed_at: str = Field(description="When the auditor sealed (RFC 3339 UTC)")
    prev: str = Field(description="SHA-256 (hex) of the previous seal's signed bytes; 64 zeros for seal 1")
    reason: str = Field(description="interval, run_ended or start")
    signer: str = Field(description="Key id (nkey public key, U…) of the auditor that signed")
    signature: str = Field(description="Ed25519 signature, base64url without padding")


_QUERY_TENANT = ("Deprecated, ignored: the query is answered for the query subject's tenant. A query whose "
                 "tenant differs from the subject's is refused.")


class RunsQuery(Message):
    tenant: str | None = Field(default=None, description=_QUERY_TENANT)
    status: str | None = None
    workflow_id: str | None = None
    limit: int = 100
    idempotency_key: str | None = Field(default=None, description="Only the run this trigger key started")
    started_after: str | None = Field(default=None, description="Only runs started at or after (ISO 8601)")
    started_before: str | None = Field(default=None, description="Only runs started before (ISO 8601)")
    before_started_at: str | None = Field(
        default=None, description="Page cursor: only runs after (older than) the run that started at this time "
                                  "with id ``before_run_id``, in the newest-first order")
    before_run_id: str | None = None


class RunQuery(Message):
    run_id: str
    tenant: str | None = Field(default=None, description=_QUERY_TENANT)
    after_seq: int = Field(default=0, ge=0, description="Timeline: only events after this run seq (a page cursor)")
    limit: int | None = Field(default=None, ge=1, description="Timeline: at most this many events")


class UsageQuery(Message):
    """Model usage summed per run, workflow or tenant (``interlock cost``)."""

    tenant: str | None = Field(default=None, description=_QUERY_TENANT)
    group_by: Literal["run", "workflow", "tenant"] = "workflow"
    run_id: str | None = None
    workflow_id: str | None = None
    since: datetime | None = Field(default=None, description="Outcomes recorded at or after this time")
    limit: int = 100


class FailuresQuery(Message):
    """Failed runs of a workflow grouped by the step and error where they broke (``interlock run failures``)."""

    tenant: str | None = Field(default=None, description=_QUERY_TENANT)
    workflow_id: str
    since: datetime | None = Field(default=None, description="Runs started at or after this time")
    limit: int = Field(default=1000, ge=1, le=10_000, description="At most this many failed runs, newest first")


class SchedulesQuery(Message):
    """The workflow schedules of the query subject's tenant (``interlock schedules``); the planner answers."""

    workflow_id: str | None = Field(default=None, description="Only this workflow's schedule")


class QueryReply(Message):
    """The answer to a query: ``ok`` with a ``result`` (its schema is the query's reply type, e.g.
    ``RunsReply``), or ``ok: false`` with an ``error``."""

    ok: bool
    error: str | None = None
    result: Any = None


# -- query results (the auditor's projection) ---------------------------------------------------
# Times in query results are the RFC 3339 strings of the events they come from. Projected from the
# run's log, a field is null where the log has no value for it.
class RunSummary(Message):
    """One run, as the runs query lists it and the status query starts."""

    run_id: str
    tenant: str
    workflow_id: str | None = None
    workflow_version: str | None = None
    definition_hash: str | None = None
    status: str = Field(description="running, compensating, succeeded, failed, denied, cancelled or timed_out")
    idempotency_key: str | None = None
    requested_by: str | None = None
    rerun_of: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    reason: str | None = Field(default=None, description="Why the run ended (failed, denied, cancelled, timed out)")
    last_seq: int = Field(description="seq of the run's last event")
    events: int = Field(description="Number of events (equals last_seq)")
    head_hash: str = Field(description="hash of the run's last event")
    chain_ok: bool = Field(description="false: the auditor found a problem in the hash chain")
    problem_count: int = 0


class StepAttempt(Message):
    attempt: int
    job_id: str | None = None
    topic: str | None = None
    dispatched_at: str | None = None
    ended_at: str | None = None
    outcome: str | None = Field(default=None,
                                description="dispatched, running, succeeded, failed or timed_out")
    worker: str | None = None
    error: str | None = None


class StepDecision(Message):
    decision: str | None = Field(default=None, description="allow, deny or require_approval")
    snapshot_id: str | None = None
    rule_ids: list[str] = Field(default_factory=list)


class StepApproval(Message):
    """The latest approval request of a step and what became of it."""

    status: str = Field(description="requested, granted, rejected, expired or invalidated")
    job_hash: str | None = None
    snapshot_id: str | None = None
    approver_role: str | None = None
    prompt: str | None = None
    approver: str | None = None
    reason: str | None = None
    requested_at: str | None = None
    expires_at: str | None = None
    decided_at: str | None = None
    seq: int


class UsageTotals(Message):
    """Model calls summed (a step's attempts, or a whole run)."""

    calls: int = Field(ge=0)
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    cost_usd: float = Field(ge=0)


class StepStatus(Message):
    step_id: str
    status: str = Field(description="ready, released, awaiting_approval, dispatched, running, retry_wait, "
                                    "timed_out, succeeded, failed, skipped, denied, cancelled or expanded")
    step_type: str | None = Field(default=None, description="job, approval, notify, ...")
    topic: str | None = None
    parent_id: str | None = None
    compensation_of: str | None = None
    item_count: int | None = None
    attempt: int = Field(description="The current (latest) attempt, 0 before the first dispatch")
    attempts: int = Field(description="Number of attempts in history")
    history: list[StepAttempt] = Field(default_factory=list)
    job_hash: str | None = None
    decision: StepDecision | None = None
    approval_status: str | None = None
    approver: str | None = None
    approval: StepApproval | None = None
    output: Any = None
    output_ref: PayloadRef | None = None
    error: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    usage: UsageTotals | None = Field(default=None, description="Model calls of the step's attempts (ctx.record_llm)")


class RunStatus(RunSummary):
    """One run and each of its steps (the status query)."""

    problems: list[str] = Field(default_factory=list, description="Hash-chain problems the auditor found")
    steps: list[StepStatus] = Field(default_factory=list)
    usage: UsageTotals | None = Field(default=None, description="Model calls of the whole run")
    paused: bool = Field(default=False, description="A person paused dispatching (``run pause``; issue 17)")


class TimelineEntry(Message):
    """One event of a run, as the timeline query lists it (in seq order)."""

    seq: int
    at: str | None = None
    service: str | None = None
    type: str | None = None
    step_id: str | None = None
    attempt: int | None = None
    summary: str = Field(description="One line for people")
    details: dict[str, Any] = Field(default_factory=dict)
    hash: str | None = None
    problems: list[str] = Field(default_factory=list)
    data: Any = Field(default=None, description="The event's data (only where the query asks for it)")


class PendingApproval(Message):
    """An approval waiting for a decision (the approvals query)."""

    run_id: str
    tenant: str
    workflow_id: str | None = None
    step_id: str
    seq: int = Field(description="seq of the ApprovalRequested event")
    job_hash: str | None = Field(default=None, description="Send it back in the ApprovalDecision")
    snapshot_id: str | None = None
    approver_role: str | None = None
    prompt: str | None = None
    requested_at: str | None = None
    expires_at: str | None = None


class RunsReply(QueryReply):
    """Reply of the runs query: newest first, at most ``limit``."""

    result: list[RunSummary] | None = None


class StatusReply(QueryReply):
    """Reply of the status query (``ok: false`` with an error naming the run when it is unknown)."""

    result: RunStatus | None = None


class TimelineReply(QueryReply):
    """Reply of the timeline query: every event of the run in seq order."""

    result: list[TimelineEntry] | None = None


class UsageRow(Message):
    """Model usage of one run, workflow or tenant (the usage query's ``group_by``)."""

    key: str | None = Field(description="The run id, workflow id or tenant")
    runs: int = Field(ge=0)
    calls: int = Field(ge=0)
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    cost_usd: float = Field(ge=0)


class FailedRun(Message):
    """One failed run and the step it broke at (the failures query)."""

    run_id: str
    started_at: str | None = None
    step_id: str | None = Field(default=None, description="Its first failed step; null: no step failed")
    error: str | None = Field(default=None, description="That step's error message (sensitive values redacted)")
    reason: str | None = Field(default=None, description="The run's own reason (RunFailed)")


class FailuresReply(QueryReply):
    """Reply of the failures query: the failed runs, newest first (the client groups them)."""

    result: list[FailedRun] | None = None


class CacheEntry(Message):
    """A successful job's output in the result cache (bucket ``il_cache``), written by the dispatcher."""

    tenant: str
    workflow_id: str
    step_id: str = Field(description="The workflow step (for_each items share their step's entries)")
    run_id: str = Field(description="The run whose job produced the output")
    source_step_id: str = Field(description="The run step that produced it (``fan[2]`` for an item)")
    job_hash: str
    cache_key: str = Field(description="sha256 hex digest of the rendered cache key")
    output: Any = None
    output_ref: PayloadRef | None = None
    stored_at: datetime
    expires_at: datetime


class UsageReply(QueryReply):
    """Reply of the usage query: most expensive first, at most ``limit``."""

    result: list[UsageRow] | None = None


class ScheduleRow(Message):
    """One workflow schedule, as the schedules query lists it."""

    workflow_id: str
    workflow_version: str = Field(description="The latest version, whose schedule this is")
    tenant: str
    cron: str | None = None
    every: str | None = None
    timezone: str = Field(description="The cron expression's time zone (UTC for every)")
    missed: str = Field(description="What happens to ticks missed while no planner ran: skip or catch_up_once")
    next_tick: datetime = Field(description="When the next run starts (UTC)")
    armed: bool = Field(description="True when the next tick is set as a durable timer; false for a moment after "
                                    "a tick fired, or when no planner has seen the schedule yet")
    last_tick: datetime | None = Field(default=None, description="The latest tick due so far (UTC)")
    last_run_id: str | None = Field(default=None, description="The run of the latest tick (its id is derived "
                                                              "from tenant, workflow and tick)")
    last_run_status: str | None = Field(default=None, description="That run's status; null when the tick started "
                                                                  "no run (skipped, or not yet handled)")


class SchedulesReply(QueryReply):
    """Reply of the schedules query: one row per scheduled workflow of the tenant, by workflow id."""

    result: list[ScheduleRow] | None = None


class FeedbackQuery(Message):
    """Feedback on a run's step outputs, or on a workflow's (``interlock feedback list|export``)."""

    tenant: str | None = Field(default=None, description=_QUERY_TENANT)
    run_id: str | None = None
    workflow_id: str | None = None
    limit: int = 1000


class FeedbackRow(Message):
    """One piece of feedback, with the output it is about."""

    run_id: str
    seq: int = Field(description="The FeedbackGiven event's seq in the run")
    workflow_id: str | None = None
    workflow_version: str | None = None
    step_id: str
    attempt: int = 0
    output_hash: str
    output: Any = Field(default=None, description="The step's output as projected ([sensitive] where sealed)")
    by: str
    via: str = ""
    score: float | None = None
    correction: Any = None
    note: str = ""
    at: str | None = None


class FeedbackReply(QueryReply):
    """Reply of the feedback query: oldest first, at most ``limit``."""

    result: list[FeedbackRow] | None = None


class ApprovalsReply(QueryReply):
    """Reply of the approvals query: oldest request first, at most ``limit``."""

    result: list[PendingApproval] | None = None


# -- published by nats-server: the JetStream API audit and stream action advisories -----------
class ApiAuditClient(Message):
    """Who made a JetStream API request, as the server saw the connection (its ``ClientInfo``)."""

    start: datetime | None = Field(default=None, description="When the connection was opened")
    host: str = ""
    id: int | None = Field(default=None, description="The connection id on that server")
    acc: str = Field(default="", description="The account (its public key in operator mode)")
    user: str = Field(default="", description="The user: in operator mode the user's public key")
    name_tag: str = Field(default="", description="The user JWT's name: the Interlock principal")
    name: str = Field(default="", description="The connection's name (a client option, not authenticated)")
    lang: str = ""
    ver: str = ""
    server: str = ""
    kind: str = ""
    client_type: str = ""


class JsApiAudit(Message):
    """``io.nats.jetstream.advisory.v1.api_audit``: one JetStream API request and the answer.

    ``request`` and ``response`` are the JSON bodies as strings (``request`` empty for requests
    without a body, such as a stream delete)."""

    type: str = Field(description="io.nats.jetstream.advisory.v1.api_audit")
    id: str = Field(description="Unique id of the advisory")
    timestamp: datetime
    server: str = Field(description="The server that answered")
    client: ApiAuditClient | None = None
    subject: str = Field(description="The API subject, e.g. $JS.API.STREAM.UPDATE.IL_EVENTS")
    request: str = ""
    response: str = ""
    domain: str = ""


class AdvisoryTruncation(Message):
    """How an advisory too large for the record was shortened: its size and digest as received."""

    size: int = Field(description="Bytes of the advisory as the server sent it")
    sha256: str = Field(description="sha256 (hex) of the advisory as the server sent it")
    fields: list[str] = Field(default_factory=list, description="The fields that were cut (request, response)")


class AdminAuditRecord(JsApiAudit):
    """The auditor's record of a request that changed a stream or the account: the server's API
    audit advisory as it came (who, the request, the answer), or, when larger than the record
    takes, shortened, with ``truncated`` saying so."""

    truncated: AdvisoryTruncation | None = None


class JsStreamAction(Message):
    """``io.nats.jetstream.advisory.v1.stream_action``: a stream was created, updated or deleted
    (the server's own advisory; it names no client)."""

    type: str = Field(description="io.nats.jetstream.advisory.v1.stream_action")
    id: str = Field(description="Unique id of the advisory")
    timestamp: datetime
    stream: str
    action: str = Field(description="create, modify or delete")
    template: str = ""
    domain: str = ""
