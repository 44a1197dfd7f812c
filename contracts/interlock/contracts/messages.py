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
    input: Any = None
    input_ref: PayloadRef | None = None
    deadline: datetime | None = None
    heartbeat_interval_ms: int = 2000
    job_hash: str
    constraints: dict[str, Any] = Field(default_factory=dict, description="Handed on by policy")
    trace_parent: str | None = None


class JobError(Message):
    message: str
    retryable: bool = True
    kind: str = "error"


class JobResult(Message):
    """What a worker reports for one attempt, published on ``il.result.{tenant}.{run_id}``."""

    job_id: str
    run_id: str
    tenant: str
    step_id: str
    attempt: int = Field(ge=1)
    ok: bool
    output: Any = None
    output_ref: PayloadRef | None = None
    error: JobError | None = None
    worker: str = ""


class Heartbeat(Message):
    """Sent by a worker while a job runs, on ``il.hb.{tenant}.{run_id}``."""

    job_id: str
    run_id: str
    tenant: str
    step_id: str
    attempt: int = Field(ge=1)
    worker: str = ""
    progress: str | None = None


class Notification(Message):
    """Published by a notify step on ``il.notify.{tenant}.{channel}``."""

    run_id: str
    tenant: str
    workflow_id: str
    step_id: str
    channel: str
    message: str
    data: Any = None


class CancelNotice(Message):
    """Tells running workers of a run that it was cancelled."""

    run_id: str
    tenant: str
    reason: str = ""


class TimerFired(Message):
    """A durable timer's payload; it fires on ``il.timer.fire.{kind}`` at its due time."""

    kind: Literal["retry", "deadline", "lease", "approval_expiry", "approval_escalation", "run_timeout"]
    run_id: str
    tenant: str
    step_id: str | None = None
    attempt: int | None = None
    due_at: datetime


class AgentRegistration(Message):
    """An agent worker's entry in the agent registry."""

    worker_id: str
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


class RunQuery(Message):
    run_id: str
    tenant: str | None = Field(default=None, description=_QUERY_TENANT)


class QueryReply(Message):
    ok: bool
    error: str | None = None
    result: Any = None


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
