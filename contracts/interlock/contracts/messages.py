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
