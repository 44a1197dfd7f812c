"""Request and response bodies of the HTTP API (their JSON Schemas are in ``/openapi.json``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TOKEN = r"^[A-Za-z0-9_\-]+$"
TOPIC = r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$"  # a job topic: dotted tokens
VERSION = r"^[0-9A-Za-z.+_\-]+$"  # a workflow or policy version (interlock.core.workflow: also a digit)


class Body(BaseModel):
    """A request body: unknown fields are refused, naming them (a typo is not silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    """A response whose rows may carry more fields than documented (newer auditors add some)."""

    model_config = ConfigDict(extra="allow")


# -- runs ---------------------------------------------------------------------------------------
class StartRun(Body):
    input: dict[str, Any] = Field(default_factory=dict, description="The run's input (the workflow's input schema)")
    version: str | None = Field(default=None, max_length=128, pattern=VERSION,
                                description="Pin a workflow version; latest if omitted")
    priority: int | None = Field(default=None, ge=1, le=5, description=(
        "1 (lowest) to 5 (highest): a saturated topic hands out higher ones first; default the workflow's, else 3"))


class RunLinks(BaseModel):
    self: str
    timeline: str
    events: str


class RunAccepted(BaseModel):
    run_id: str
    workflow_id: str
    idempotency_key: str
    created: bool = Field(description="True: this request started the run; false: the key had started it before")
    links: RunLinks


class RunRow(Open):
    run_id: str
    tenant: str | None = None
    workflow_id: str | None = None
    workflow_version: str | None = None
    status: str | None = None
    idempotency_key: str | None = None
    requested_by: str | None = None
    rerun_of: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    reason: str | None = None
    events: int | None = None
    chain_ok: bool | None = None


class RunDetail(RunRow):
    steps: list[dict[str, Any]] = Field(default_factory=list, description="Each step's state, attempts, decision, "
                                                                          "approval, output and error")
    problems: list[Any] = Field(default_factory=list)
    projected: bool = Field(default=True, description="False: the auditor has not projected the run yet; this is "
                                                      "the run as its event log gives it")


class RunsPage(BaseModel):
    items: list[RunRow]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null: no more")


class TimelinePage(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null: no more (for now)")


class StepDiffRow(BaseModel):
    step_id: str
    a: dict[str, Any] | None = Field(description="The step in run a (null: run a has no such step)")
    b: dict[str, Any] | None = Field(description="The step in run b (null: run b has no such step)")
    differs: list[str] = Field(description="Fields that differ: status, attempts, input, output, error, decision, "
                                           "rules, approval, cache")
    first_divergence: bool


class RunDiff(BaseModel):
    """Two runs aligned step by step (sensitive values redacted, never compared)."""

    a: dict[str, Any]
    b: dict[str, Any]
    run_differs: list[str]
    first_divergence: dict[str, Any] | None = Field(description="{step_id, fields} of the first step that differs")
    steps: list[StepDiffRow]


class FailureGroupRow(BaseModel):
    step_id: str = Field(description="Where the runs broke; (run): no step failed")
    error: str
    runs: int
    first_at: str | None = None
    last_at: str | None = None
    run_ids: list[str] = Field(description="The latest of them, newest first")


class FailuresPage(BaseModel):
    items: list[FailureGroupRow]


class Rerun(Body):
    from_step: str = Field(min_length=1, max_length=256, description="Run this step and everything downstream again")
    dry_run: bool = Field(default=False, description="Only show what would run again")


class RerunStep(BaseModel):
    step_id: str
    runs_again: bool


class RerunResult(BaseModel):
    source_run_id: str
    from_step: str
    dry_run: bool
    run_id: str | None = Field(description="The new run (null for a dry run)")
    steps: list[RerunStep]


class Cancel(Body):
    reason: str = Field(default="", max_length=2000)


# -- intervening in a run, feedback (issue 17) ----------------------------------------------------
class Intervene(Body):
    reason: str = Field(min_length=1, max_length=2000, description="Why (required): recorded in the run's log")


class RetryStep(Intervene):
    input: Any = Field(default=None, description="Retry with this input instead (given, even null: the job hash is "
                                                 "recomputed and policy and approvals decide again); absent: the "
                                                 "step's input")


class SkipStep(Intervene):
    output: Any = Field(description="The step's output: what its dependants see")


class Feedback(Body):
    score: float | None = Field(default=None, allow_inf_nan=False, description="A rating of the output")
    correction: Any = Field(default=None, description="The output as it should have been (given, even null)")
    note: str = Field(default="", max_length=10_000)
    output_hash: str | None = Field(default=None, max_length=128,
                                    description="Refuse unless the step's output has this hash")


class FeedbackPage(BaseModel):
    items: list[dict[str, Any]] = Field(description="Oldest first: run, step, attempt, output and its hash, score, "
                                                    "correction, note, by, via, at")


class CommandResult(BaseModel):
    ok: bool
    detail: Any = None


# -- approvals ----------------------------------------------------------------------------------
class PendingApprovalRow(Open):
    run_id: str
    step_id: str
    workflow_id: str | None = None
    job_hash: str | None = None
    snapshot_id: str | None = None
    approver_role: str | None = None
    prompt: str | None = None
    requested_at: str | None = None
    expires_at: str | None = None


class ApprovalsPage(BaseModel):
    items: list[PendingApprovalRow]


class Approve(Body):
    reason: str = Field(default="", max_length=2000)
    job_hash: str | None = Field(default=None, max_length=128, description="Bind the decision to this job hash "
                                                                           "(default: the one asked for)")


class Reject(Body):
    reason: str = Field(min_length=1, max_length=2000, description="Why: the run fails with it")
    job_hash: str | None = Field(default=None, max_length=128)


# -- workflows ----------------------------------------------------------------------------------
class ApplyWorkflow(Body):
    source: str = Field(min_length=1, description="The workflow's YAML text")
    filename: str | None = Field(default=None, max_length=256, description="Shown in error messages")
    files: dict[str, str] = Field(default_factory=dict, max_length=64, description=(
        "The guard rule files the workflow names (deny_file, allow_file): relative path -> text"))


class WorkflowApplied(BaseModel):
    workflow_id: str
    version: str
    created: bool = Field(description="False: this exact version was registered already")


class WorkflowSummary(BaseModel):
    workflow_id: str
    versions: list[str]


class WorkflowVersions(BaseModel):
    workflow_id: str
    versions: list[str]
    latest: str


# -- policy -------------------------------------------------------------------------------------
class PolicyEval(Body):
    workflow_id: str = Field(pattern=TOKEN, max_length=256)
    step_id: str = Field(min_length=1, max_length=256)
    input: Any = None
    version: str | None = Field(default=None, max_length=128, pattern=VERSION)


class PolicySource(Body):
    source: str = Field(description="A Cedar policy bundle")
    version: str | None = Field(default=None, max_length=128)


class PolicySimulate(Body):
    source: str = Field(description="A draft Cedar policy bundle")
    limit: int = Field(default=500, ge=1, le=10_000, description="How many recent decisions to re-decide")


class PolicyRollback(Body):
    to: str | None = Field(default=None, max_length=128, description="A version; default: the previous bundle")


class PolicyRevisionOut(BaseModel):
    revision: int
    snapshot_id: str
    version: str
    source: str
    published_at: str = ""
    published_by: str = ""
    builtin: bool = False


class PolicyRuleMatchOut(BaseModel):
    action: str
    decision: str
    matched: list[str]
    errors: list[str]


class PolicyDecisionOut(BaseModel):
    decision: str
    snapshot_id: str
    rule_ids: list[str]
    reason: str = ""
    approver_role: str | None = None
    approval_expires_ms: int | None = None
    constraints: dict[str, Any] = Field(default_factory=dict)
    explain: list[PolicyRuleMatchOut] = Field(default_factory=list)


class PolicyChangeOut(BaseModel):
    run_id: str
    step_id: str
    was: str
    now: str
    rules: list[str]
    reason: str


class PolicySimulationOut(BaseModel):
    checked: int
    changes: list[PolicyChangeOut]


# -- operations ---------------------------------------------------------------------------------
class VerifyOut(BaseModel):
    run_id: str
    tenant: str
    events: int
    ok: bool
    head_hash: str | None
    problems: list[dict[str, Any]]


class AuditExport(BaseModel):
    run_id: str
    tenant: str
    events: list[dict[str, Any]] = Field(description="Every event envelope of the run, as stored (hash chain included)")
    verify: VerifyOut


# -- API keys -----------------------------------------------------------------------------------
class CreateApiKey(Body):
    role: Literal["viewer", "operator", "approver", "policy-admin", "admin"]
    principal: str | None = Field(default=None, pattern=TOKEN, max_length=128,
                                  description="Who the key acts as (default key-{id})")


class ApiKeyOut(BaseModel):
    key_id: str
    tenant: str
    role: str
    principal: str
    created_at: str
    created_by: str
    revoked_at: str | None
    revoked_by: str


class ApiKeyCreated(BaseModel):
    key: str = Field(description="The key: shown once, never stored (keep it secret)")
    record: ApiKeyOut


class ApiKeysPage(BaseModel):
    items: list[ApiKeyOut]


class RolloutStart(Body):
    """A canary rollout of one agent version of a topic (``interlock agents rollout``)."""

    topic: str = Field(pattern=TOPIC, max_length=256, description="The job topic, e.g. llm.summarize")
    to: str = Field(pattern=VERSION, max_length=128, description="The agent version to roll out")
    share: float = Field(gt=0.0, le=1.0, description="The share of jobs it gets (0.1 = 10%)")
    stable: str | None = Field(default=None, pattern=VERSION, max_length=128,
                               description="The stable version (default: the one other live version)")
    window_s: float = Field(default=300.0, gt=0, description="Promote after this long within the thresholds")
    min_jobs: int = Field(default=20, ge=1, description="Canary jobs needed before any verdict")
    max_failure_delta: float = Field(default=0.05, ge=0.0)
    max_latency_ratio: float = Field(default=1.5, gt=0.0)


class RolloutAbort(Body):
    reason: str = Field(default="", max_length=1000)
