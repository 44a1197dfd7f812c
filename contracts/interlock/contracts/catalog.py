"""Every channel Interlock uses, declared once: subject pattern, message, direction and transport.

A channel ties a subject pattern (built by a function of :mod:`interlock.contracts.subjects`, with
named parameters such as ``{tenant}``) to the message type it carries, who publishes and who
subscribes, and how it travels:

- ``jetstream``: published into a stream (``stream``), consumed by durable consumers;
- ``core``: plain NATS publish/subscribe, nothing stored;
- ``request``: NATS request-reply; the responder answers with ``reply`` on the requester's inbox.

The AsyncAPI document and the JSON Schema files (see :mod:`interlock.contracts.generate`) are
produced from this module and the pydantic models; nothing here is spelled twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from interlock.contracts import events as ev
from interlock.contracts import headers as h
from interlock.contracts import messages as msg
from interlock.contracts import subjects as s
from interlock.contracts import timing

CONTRACTS_VERSION = "0.1.0"

Transport = Literal["jetstream", "core", "request"]

# -- who takes part (roles, not processes: one process may play several) ------------------
# The five services (their names are also the ``service`` of the events they append and the
# ``{service}`` of their dead letters), then everything around them.
PLANNER = "planner"
POLICY = "policy"
APPROVAL = "approval"
DISPATCHER = "dispatcher"
AUDITOR = "auditor"
WORKER = "worker"
CLIENT = "client"
NATS_SERVER = "nats-server"
INTEGRATION = "integration"
OPERATOR = "operator"

SERVICES: Mapping[str, str] = MappingProxyType({
    PLANNER: "Starts runs from triggers and workflow schedules, advances them as steps finish, cancels and times "
             "out runs; answers the schedules query.",
    POLICY: "Decides every ready job (allow, deny, require approval) before any side effect.",
    APPROVAL: "Records approval decisions and expires approvals nobody decided in time.",
    DISPATCHER: "Publishes released jobs, turns results and heartbeats into outcomes, schedules retries, "
                "deadlines and leases, publishes notifications and cancel notices.",
    AUDITOR: "Reads run event logs and answers queries (runs, status, timeline, approvals); records who "
             "changed which stream (admin audit).",
    WORKER: "An agent worker (any language): pulls jobs for its topic, heartbeats, reports results.",
    CLIENT: "The interlock CLI, API gateways, webhooks: start runs, send commands, ask queries.",
    NATS_SERVER: "The NATS server itself: delivers scheduled messages (JetStream message schedules) and "
                 "reports every JetStream API request (API audit advisories) and every stream created, updated or "
                 "deleted (stream action advisories).",
    INTEGRATION: "Anything that forwards notifications (chat, e-mail, paging).",
    OPERATOR: "People and tools (interlock CLI) that inspect dead letters.",
})
SERVICES_APPENDING_EVENTS = (PLANNER, POLICY, APPROVAL, DISPATCHER)


@dataclass(frozen=True)
class Param:
    """A named subject token that varies per message, written ``{name}`` in a channel address."""

    name: str
    description: str


@dataclass(frozen=True)
class Pattern:
    """A subject pattern: a :mod:`subjects` function called with fixed tokens and/or parameters."""

    build: Callable[..., str]
    args: tuple[str | Param, ...] = ()

    def _sentinel(self, index: int) -> str:
        return f"__param{index}__"

    @property
    def address(self) -> str:
        """The subject with every parameter written as ``{name}``, e.g. ``il.job.{topic}``."""
        values = [self._sentinel(i) if isinstance(a, Param) else a for i, a in enumerate(self.args)]
        subject = self.build(*values)
        for i, arg in enumerate(self.args):
            if isinstance(arg, Param):
                sentinel = self._sentinel(i)
                if subject.count(sentinel) != 1:
                    raise ValueError(f"{self.build.__name__}: parameter {arg.name!r} not found once in {subject!r}")
                subject = subject.replace(sentinel, "{" + arg.name + "}")
        return subject

    @property
    def parameters(self) -> tuple[Param, ...]:
        return tuple(a for a in self.args if isinstance(a, Param))

    def subject(self, **values: str) -> str:
        """The concrete subject for the given parameter values (validated by :mod:`subjects`)."""
        names = {p.name for p in self.parameters}
        if set(values) != names:
            raise TypeError(f"{self.address}: expected parameters {sorted(names)}, got {sorted(values)}")
        return self.build(*(values[a.name] if isinstance(a, Param) else a for a in self.args))


@dataclass(frozen=True)
class Header:
    """A NATS header that is part of the contract of a channel."""

    name: str
    description: str
    required: bool = True
    example: str | None = None


@dataclass(frozen=True)
class Channel:
    id: str
    title: str
    pattern: Pattern
    message: type[msg.Message]
    description: str
    transport: Transport
    publishers: tuple[str, ...]
    subscribers: tuple[str, ...]
    stream: str | None = None
    reply: type[msg.Message] | None = None
    headers: tuple[Header, ...] = ()
    filters: tuple[Pattern | str, ...] = ()
    """Wildcard subjects subscribers (streams, consumers) bind to."""
    consumer: str | None = None
    """How subscribers consume (durable consumer names, delivery), where it is part of the contract."""
    event_data: Mapping[str, type[ev.EventData]] = field(default_factory=dict)
    """For run events: the type of each event's ``data``, by the envelope's ``type``."""

    @property
    def address(self) -> str:
        return self.pattern.address

    @property
    def parameters(self) -> tuple[Param, ...]:
        return self.pattern.parameters

    def __post_init__(self) -> None:
        if (self.transport == "jetstream") != (self.stream is not None):
            raise ValueError(f"channel {self.id}: a stream is given exactly for jetstream channels")
        if (self.transport == "request") != (self.reply is not None):
            raise ValueError(f"channel {self.id}: a reply type is given exactly for request channels")


# -- parameters ----------------------------------------------------------------------------
TENANT = Param("tenant", "Tenant id: one subject token (letters, digits, '_' and '-'); 'default' when unset.")
RUN_ID = Param("run_id", "Run id: one subject token (a UUID).")
WORKFLOW_ID = Param("workflow_id", "Workflow id: one subject token.")
PRINCIPAL = Param("principal", "The principal sending the command (one subject token): the name in its credential. "
                  "The server lets a credential send commands under its own name only, so the service "
                  "takes who approved, rejected or cancelled from here, never from the body.")
TOPIC = Param(
    "topic",
    "Job topic: one or more dot-separated tokens (letters, digits, '_' and '-'), no wildcards, "
    "e.g. 'llm.summarize'. The address therefore has as many tokens as the topic has.",
)
AGENT_VERSION = Param("version", "Agent version as one token (subjects.version_token): '.' becomes '_', e.g. "
                      "'2_1_0' for 2.1.0.")
TIMER_KIND = Param("kind", "Timer kind: retry, deadline, lease, breaker (a held job's re-check), gate (a "
                           "rate-limited job's token), approval_expiry or run_timeout.")
TIMER_KEY = Param("key", "Timer key, unique within the run and kind (one subject token).")
NOTIFY_CHANNEL = Param("channel", "Notification channel name from the workflow's notify step (one token).")
SERVICE = Param("service", "Name of the service that gave up on the message (one token).")
WRITER = Param("writer", "The service that appended the commit (planner, policy, approval or dispatcher): "
                         "routing only, authorship is the commit's signature.")
ROUTE = Param("route", "Who must act on the commit: 'approval' (a decision that waits for a person) or 'flow'. "
                       "Each service's consumer is filtered by writer and route (interlock.contracts.routing).")
LANE = Param("lane", "The run's lane: 'fast' (priority 4 or more) or 'slow'. Planner, policy and dispatcher consume "
                     "the fast lane first (interlock.contracts.routing.lane_of).")

# -- headers -------------------------------------------------------------------------------
EVENT_MSG_ID = Header(
    h.MSG_ID,
    "Deduplication id of the commit: '{run_id}@{seq of its first event}:{first 16 hex of its last event hash}'. "
    "A retried publish of the same commit is dropped by the stream (within its duplicate window).",
    example="0b6c7a52-5f0e-4a7e-9a53-2d1f6c1c8e0e@1:3f2a9c0d1e2b4a5c",
)
EXPECTED_LAST_SUBJECT_SEQ = Header(
    h.EXPECTED_LAST_SUBJECT_SEQ,
    "Stream sequence of the run's last commit ('0' for a new run). The stream rejects the append with "
    "error 10071 when another writer appended first (optimistic concurrency): reload and retry.",
    example="0",
)
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = Header(
    h.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT,
    "The subject filter the expected sequence is about: the run's whole log, il.evt.{tenant}.{run_id}.> "
    "(a run's commits are on several subjects, one per writer and route).",
    example="il.evt.default.0b6c7a52-5f0e-4a7e-9a53-2d1f6c1c8e0e.>",
)
COMMIT_SIGNER = Header(
    h.SIGNER,
    "Key id of the service instance that signed the commit: its nkey public key (U…), as in the keyring "
    "(KV bucket il_keyring). See contracts/README.md, 'Signed commits'.",
    example="UD54DHFVRMCS466ZD7LEDVLW7USRXQP6LXYDBEN2YY5FOD2EOJME4DCS",
)
COMMIT_SIGNATURE = Header(
    h.SIGNATURE,
    "base64url (no padding) Ed25519 signature of the RFC 8785 form of the commit statement (domain, subject, "
    "run_id, tenant, first_seq, last_seq, prev_hash, head_hash). A commit without a valid one changes nothing.",
)
TRIGGER_MSG_ID = Header(
    h.MSG_ID,
    "Recommended: 'trigger:{tenant}:{workflow_id}:{idempotency_key}', so a re-sent trigger is stored once. "
    "(The run id is derived from the same three values, so a duplicate never starts a second run anyway.)",
    required=False,
    example="trigger:default:summarize:order-42",
)
JOB_MSG_ID = Header(
    h.MSG_ID,
    "The job id, so a job published again after a crash is stored once.",
    example="0b6c7a52-5f0e-4a7e-9a53-2d1f6c1c8e0e:summarize@1",
)
NOTIFY_MSG_ID = Header(
    h.MSG_ID,
    "'notify:{run_id}:{step_id}', so each notify step's notification is stored once.",
    example="notify:0b6c7a52-5f0e-4a7e-9a53-2d1f6c1c8e0e:tell_ops",
)
RESULT_MSG_ID = Header(
    h.MSG_ID,
    "'result:' + job_id, so a result published twice (retry after a lost ack) is stored once.",
    example="result:0b6c7a52-5f0e-4a7e-9a53-2d1f6c1c8e0e:summarize@1",
)
SCHEDULE = Header(
    h.SCHEDULE,
    "When the timer fires: '@at ' + RFC 3339 UTC time (JetStream message schedules).",
    example="@at 2030-01-01T00:00:00Z",
)
SCHEDULE_TARGET = Header(
    h.SCHEDULE_TARGET,
    "Subject the server publishes the payload to when due: il.timer.fire.{kind}.",
    example="il.timer.fire.retry",
)

# -- channels ------------------------------------------------------------------------------
TRIGGERS = Channel(
    id="triggers",
    title="Triggers",
    pattern=Pattern(s.trigger, (TENANT, WORKFLOW_ID)),
    message=msg.Trigger,
    description="Start a run of a workflow in the subject's tenant: the subject's workflow_id must equal the "
                "body's, and a body that names another tenant is dead-lettered. The same "
                "(tenant, workflow_id, idempotency_key) never starts two runs. A workflow may also declare "
                "its own trigger subjects (added to the stream); a message on one of those is any JSON, "
                "taken as the run's input, and starts a run in tenant 'default' (those subjects carry no "
                "tenant).",
    transport="jetstream",
    stream=s.TRIGGERS_STREAM,
    publishers=(CLIENT,),
    subscribers=(PLANNER,),
    headers=(TRIGGER_MSG_ID,),
    filters=(s.TRIGGERS_ALL,),
)

JOBS = Channel(
    id="jobs",
    title="Jobs",
    pattern=Pattern(s.job, (TENANT, TOPIC)),
    message=msg.Job,
    description="A unit of work for one tenant's agent workers of one topic (work-queue stream: a job is "
                "delivered to one worker and removed when acked). job_id is 'run_id:step_id@attempt'; the "
                "body's tenant equals the subject's.",
    transport="jetstream",
    stream=s.JOBS_STREAM,
    publishers=(DISPATCHER,),
    subscribers=(WORKER,),
    headers=(JOB_MSG_ID,),
    filters=(s.JOBS_ALL, Pattern(s.tenant_jobs, (TENANT,))),
    consumer="One tenant's workers of one topic share the durable pull consumer "
             "'worker_{tenant}_{topic}_{digest}' ('.' in the topic replaced by '_'; digest: the first 16 hex "
             "digits of sha256 of tenant + newline + topic; subjects.worker_consumer) on stream IL_JOBS, "
             "filter subject il.job.{tenant}.{topic}, explicit ack, "
             f"ack_wait {timing.ACK_WAIT_S:g} s, max_deliver {timing.JOB_MAX_DELIVER}. A worker holds a job "
             f"un-acked while it works on it, sends a progress ack (+WPI) every {timing.PROGRESS_INTERVAL_S:g} s "
             "and acks it once its result is published: a job held by a worker that died goes to another copy "
             "within the ack wait.",
)

VERSIONED_JOBS = Channel(
    id="versionedJobs",
    title="Jobs for one agent version",
    pattern=Pattern(s.versioned_job, (TENANT, AGENT_VERSION, TOPIC)),
    message=msg.Job,
    description="A job that only workers of one agent version may take: a canary rollout's share (or its "
                "stable rest) and the jobs of steps with an agent_version range. The dispatcher records the "
                "version in the step's StepDispatched (agent_version, route). Same body as il.job.",
    transport="jetstream",
    stream=s.JOBS_STREAM,
    publishers=(DISPATCHER,),
    subscribers=(WORKER,),
    headers=(JOB_MSG_ID,),
    filters=(s.VERSIONED_JOBS_ALL, Pattern(s.tenant_versioned_jobs, (TENANT,))),
    consumer=f"A worker of version V takes one of {s.VERSION_SLOTS} durable pull consumers of its tenant's topic, "
             "'worker_{tenant}_{topic}_{digest}_v{slot}' (subjects.worker_version_consumer): the slot whose filter "
             "subject is il.vjob.{tenant}.{V}.{topic}, else a free one it creates with that filter. Same settings "
             "as the topic's consumer plus an inactive_threshold (protocol.VERSION_SLOT_IDLE_S), which frees a "
             "slot no worker pulls from. Workers that do not subscribe to it (any version) take il.job only.",
)

RESULTS = Channel(
    id="results",
    title="Job results",
    pattern=Pattern(s.result, (TENANT, RUN_ID)),
    message=msg.JobResult,
    description="What a worker reports for one attempt of a job: output (inline or output_ref) or error. "
                "The subject's tenant and run_id must equal the body's, or the result is dead-lettered.",
    transport="jetstream",
    stream=s.RESULTS_STREAM,
    publishers=(WORKER,),
    subscribers=(DISPATCHER,),
    headers=(RESULT_MSG_ID,),
    filters=(s.RESULTS_ALL,),
)

HEARTBEATS = Channel(
    id="heartbeats",
    title="Heartbeats",
    pattern=Pattern(s.heartbeat, (TENANT, RUN_ID)),
    message=msg.Heartbeat,
    description="Sent by a worker when it starts a job and then every heartbeat_interval_ms until it publishes "
                "the result; a job whose heartbeats stop (lease) is timed out and may be retried.",
    transport="jetstream",
    stream=s.RESULTS_STREAM,
    publishers=(WORKER,),
    subscribers=(DISPATCHER,),
    filters=(s.HEARTBEATS_ALL,),
)

RUN_EVENTS = Channel(
    id="runEvents",
    title="Run events",
    pattern=Pattern(s.commit_subject, (TENANT, RUN_ID, WRITER, ROUTE, LANE)),
    message=ev.Commit,
    description="One run's event log, the source of truth and audit trail (append-only stream): every message "
                "on il.evt.{tenant}.{run_id}.> in stream order. Each message is a Commit of one or more "
                "hash-chained EventEnvelopes; an envelope's data has the schema named by its type.",
    transport="jetstream",
    stream=s.EVENTS_STREAM,
    publishers=SERVICES_APPENDING_EVENTS,
    subscribers=(*SERVICES_APPENDING_EVENTS, AUDITOR),
    headers=(EVENT_MSG_ID, EXPECTED_LAST_SUBJECT_SEQ, EXPECTED_LAST_SUBJECT_SEQ_SUBJECT, COMMIT_SIGNER,
             COMMIT_SIGNATURE),
    filters=(s.EVENTS_ALL, Pattern(s.tenant_events, (TENANT,))),
    event_data=MappingProxyType(dict(ev.EVENT_TYPES)),
)

FAST_LANE_SIGNAL = Channel(
    id="fastLaneSignal",
    title="Fast-lane commits, as a signal",
    pattern=Pattern(s.commit_subject, (TENANT, RUN_ID, WRITER, ROUTE, s.FAST_LANE)),
    message=ev.Commit,
    description="The run events channel's fast-lane commits, received as they are appended by a core NATS "
                "subscription to il.evt.*.*.*.*.fast (no consumer, nothing acked). A service that sees one "
                "holds its slow-lane handlers for a moment (runtime/lanes.py, HOLD_AFTER_FAST_S), so a "
                "high-priority run does not share the cores with a backlog. Only a sign: nothing is "
                "decided or recorded from it. Published as the run events channel's commits, never apart.",
    transport="core",
    publishers=SERVICES_APPENDING_EVENTS,
    subscribers=(*SERVICES_APPENDING_EVENTS, AUDITOR),
    filters=(s.FAST_LANE_COMMITS,),
)

ALERTS = Channel(
    id="alerts",
    title="Alerts",
    pattern=Pattern(s.alerts, (TENANT,)),
    message=msg.Alert,
    description="Raised and resolved by the auditor: SLA breaches, retry and denial rates, dead-letter growth, "
                "approvals waiting too long, step latency drifting from its baseline. Stored in IL_NOTIFY.",
    transport="jetstream",
    stream=s.NOTIFY_STREAM,
    publishers=(AUDITOR,),
    subscribers=(INTEGRATION, CLIENT),
)

NOTIFICATIONS = Channel(
    id="notifications",
    title="Notifications",
    pattern=Pattern(s.notify, (TENANT, NOTIFY_CHANNEL)),
    message=msg.Notification,
    description="Published by a workflow's notify step.",
    transport="jetstream",
    stream=s.NOTIFY_STREAM,
    publishers=(DISPATCHER,),
    subscribers=(INTEGRATION,),
    headers=(NOTIFY_MSG_ID,),
    filters=(s.NOTIFY_ALL,),
)

CANCEL_NOTICES = Channel(
    id="cancelNotices",
    title="Cancel notices",
    pattern=Pattern(s.control_cancel, (TENANT, RUN_ID)),
    message=msg.CancelNotice,
    description="Tells workers that a run ended (cancelled, timed out, failed or denied): stop work on its jobs "
                "(job ids start with run_id + ':'; a late result is ignored). Core NATS, not stored: workers "
                "subscribe to their tenant's il.control.cancel.{tenant}.* for as long as they run.",
    transport="core",
    publishers=(DISPATCHER,),
    subscribers=(WORKER,),
    filters=(s.CONTROL_CANCEL_ALL, Pattern(s.tenant_control_cancel, (TENANT,))),
)

TIMER_SCHEDULES = Channel(
    id="timerSchedules",
    title="Timer schedules",
    pattern=Pattern(s.timer_schedule, (TIMER_KIND, RUN_ID, TIMER_KEY)),
    message=msg.TimerFired,
    description="A durable timer: a scheduled message the server publishes to il.timer.fire.{kind} at due_at "
                "(JetStream message schedules). Internal to Interlock.",
    transport="jetstream",
    stream=s.TIMERS_STREAM,
    publishers=(PLANNER, APPROVAL, DISPATCHER),
    subscribers=(NATS_SERVER,),
    headers=(SCHEDULE, SCHEDULE_TARGET),
    filters=(s.TIMERS_SCHEDULED_ALL,),
)

TIMERS_FIRED = Channel(
    id="timersFired",
    title="Timers fired",
    pattern=Pattern(s.timer_fired, (TIMER_KIND,)),
    message=msg.TimerFired,
    description="A durable timer that came due: run_timeout goes to the planner, approval_expiry to the "
                "approval service, retry, deadline, lease, breaker and gate (a rate-limited job's token) "
                "to the dispatcher. Internal to Interlock.",
    transport="jetstream",
    stream=s.TIMERS_STREAM,
    publishers=(NATS_SERVER,),
    subscribers=(PLANNER, APPROVAL, DISPATCHER),
    filters=(s.TIMERS_FIRED_ALL,),
)

SCHEDULE_TIMERS = Channel(
    id="scheduleTimers",
    title="Schedule ticks",
    pattern=Pattern(s.schedule_timer, (TENANT, WORKFLOW_ID)),
    message=msg.ScheduleTimer,
    description="The next tick of a workflow's schedule (`schedule:` in its definition): one scheduled message per "
                "(tenant, workflow), which the server publishes to il.timer.fire.schedule when due. Publishing "
                "again replaces it (the planner does whenever a workflow is applied and after every tick); a "
                "message without a schedule header (cancelled: true) cancels it. Internal to Interlock.",
    transport="jetstream",
    stream=s.TIMERS_STREAM,
    publishers=(PLANNER,),
    subscribers=(NATS_SERVER,),
    headers=(Header(h.SCHEDULE, "When the tick is due: '@at ' + RFC 3339 UTC time; absent on a cancellation.",
                    required=False, example="@at 2030-01-01T00:05:00Z"),
             Header(h.SCHEDULE_TARGET, "il.timer.fire.schedule", required=False, example="il.timer.fire.schedule")),
    filters=(s.TIMERS_SCHEDULED_ALL,),
)

SCHEDULE_TICKS = Channel(
    id="scheduleTicks",
    title="Schedule ticks due",
    pattern=Pattern(s.schedule_fired),
    message=msg.ScheduleTimer,
    description="A workflow schedule's tick that came due: the planner (one copy, a shared durable consumer) "
                "starts its run, keyed by the tick, and sets the next tick. Internal to Interlock.",
    transport="jetstream",
    stream=s.TIMERS_STREAM,
    publishers=(NATS_SERVER,),
    subscribers=(PLANNER,),
    filters=(s.schedule_fired(),),
)

DEAD_LETTERS = Channel(
    id="deadLetters",
    title="Dead letters",
    pattern=Pattern(s.dead_letter, (SERVICE,)),
    message=msg.DeadLetter,
    description="A message a service could not process, with the reason and its original bytes (base64).",
    transport="jetstream",
    stream=s.DLQ_STREAM,
    publishers=(PLANNER, POLICY, APPROVAL, DISPATCHER, AUDITOR, WORKER),
    subscribers=(OPERATOR,),
    filters=(s.DLQ_ALL,),
)


STREAM_EVENT = Param("event", "CREATED, UPDATED or DELETED.")
STREAM_NAME = Param("stream", "The stream's name.")

JS_API_AUDIT = Channel(
    id="jsApiAudit",
    title="JetStream API audit advisories",
    pattern=Pattern(s.js_api_audit),
    message=msg.JsApiAudit,
    description="The server's advisory for each JetStream API request it answered: who (client: account, user "
                "public key, principal name), the API subject, request and response. Sent for every request, "
                "reads (INFO, LIST) included, so no stream keeps them: the auditor service subscribes (core "
                "NATS, queue group auditor: one copy handles each) and records the changes in adminAudit.",
    transport="core",
    publishers=(NATS_SERVER,),
    subscribers=(AUDITOR,),
)

_ADMIN_AUDIT_KEPT = (
    "Kept in IL_ADMIN_AUDIT (append-only: no purge or message delete; a year). "
    "`interlock audit admin-changes` lists the changes.")

ADMIN_AUDIT = Channel(
    id="adminAudit",
    title="Admin audit: changes to streams",
    pattern=Pattern(s.admin_audit),
    message=msg.AdminAuditRecord,
    description="The auditor's record of each JetStream API request that changes a stream (create, update, "
                "delete, purge, message delete, restore) or the account (purge): the server's API audit "
                "advisory with who asked, the request and the answer; one larger than the stream's maximum "
                "message size is stored shortened, with its size and sha256. Consumer changes are not recorded "
                "(ordered consumers come and go with every watch). Published with Nats-Msg-Id = sha256 of the "
                "advisory, so a change is stored once however many auditor copies run. "
                + _ADMIN_AUDIT_KEPT,
    transport="jetstream",
    stream=s.ADMIN_AUDIT_STREAM,
    publishers=(AUDITOR,),
    subscribers=(OPERATOR,),
    headers=(Header(h.MSG_ID, "sha256 (hex) of the advisory as the server sent it.",
                    example="9460d2131eaf32de71339a636d703a38537565032491142e1d244dc998a5829f"),),
    filters=(s.ADMIN_AUDIT,),
)

STREAM_ACTIONS = Channel(
    id="streamActions",
    title="Stream action advisories",
    pattern=Pattern(s.js_stream_action, (STREAM_EVENT, STREAM_NAME)),
    message=msg.JsStreamAction,
    description="The server's own advisory that a stream was created, updated or deleted, sent whether or not "
                "an Interlock service runs; it names no client (adminAudit says who, when an auditor was "
                "running). Purges and message deletes have no advisory of their own. "
                + _ADMIN_AUDIT_KEPT,
    transport="jetstream",
    stream=s.ADMIN_AUDIT_STREAM,
    publishers=(NATS_SERVER,),
    subscribers=(OPERATOR,),
    filters=s.JS_STREAM_ACTION_SUBJECTS,
)


SEALED_STREAM = Param("stream", "The sealed stream's name (IL_EVENTS).")

SEALS = Channel(
    id="seals",
    title="Seals of a stream",
    pattern=Pattern(s.seals, (SEALED_STREAM,)),
    message=msg.Seal,
    description="The auditor's signed seals of a stream, one chain per stream: its creation time, first and last "
                "sequence, message count and the Merkle root of every run's head, plus the heads that changed "
                "since the previous seal. Taken every INTERLOCK_SEAL_INTERVAL_S seconds (default 60) when the "
                "stream grew, and soon after a run ends. Appended conditionally (the previous seal's stream "
                "sequence as expected last subject sequence), so two auditor copies never fork the chain. Kept "
                "in IL_SEALS (no purge, no message delete; only the auditor role may publish). `interlock audit "
                "seals` lists them, `interlock audit seal export` writes them to a file, `interlock audit verify` "
                "checks the stream against the latest.",
    transport="jetstream",
    stream=s.SEALS_STREAM,
    publishers=(AUDITOR,),
    subscribers=(AUDITOR, OPERATOR),
    headers=(Header(h.MSG_ID, "'seal:' + the seal's hash (the next seal's prev).",
                    example="seal:9460d2131eaf32de71339a636d703a38537565032491142e1d244dc998a5829f"),
             Header(h.EXPECTED_LAST_SUBJECT_SEQ, "Stream sequence of the previous seal ('0' for the first).",
                    example="0")),
    filters=(s.SEALS_ALL,),
)


def _command(name: str, id: str, title: str, request: type[msg.Message], service: str,
             description: str) -> Channel:
    return Channel(
        id=id, title=title, pattern=Pattern(s.command, (TENANT, name, PRINCIPAL)), message=request,
        reply=msg.CommandReply,
        description=description, transport="request", publishers=(CLIENT,), subscribers=(service,),
        filters=(Pattern(s.commands, (name,)),),
    )


def _query(name: str, id: str, title: str, request: type[msg.Message], reply: type[msg.QueryReply],
           description: str, askers: tuple[str, ...] = (), answerer: str = AUDITOR) -> Channel:
    return Channel(
        id=id, title=title, pattern=Pattern(s.query, (TENANT, name)), message=request, reply=reply,
        description=description, transport="request", publishers=(CLIENT, *askers), subscribers=(answerer,),
        filters=(Pattern(s.queries, (name,)),),
    )


_DECISION = ("The approver is the subject's principal. job_hash must be the one shown in the request. A "
             "principal without the step's role (once anyone is registered in the approver directory), or a "
             "decision for another job hash, is refused with an error naming the principal, the step and "
             "the missing role, and leaves an ApprovalRefused event in the run's log.")
CMD_APPROVE = _command("approve", "cmdApprove", "Approve", msg.ApprovalDecision, APPROVAL,
                       f"Grant a pending approval of a run of the subject's tenant. {_DECISION}")
CMD_REJECT = _command("reject", "cmdReject", "Reject", msg.ApprovalDecision, APPROVAL,
                      f"Reject a pending approval of a run of the subject's tenant. {_DECISION}")
CMD_CANCEL = _command("cancel", "cmdCancel", "Cancel", msg.CancelRequest, PLANNER,
                      "Cancel a run of the subject's tenant; the cancel is recorded as by the subject's principal.")
_ACT = (" Recorded in the run's log as by the subject's principal, with the request's reason and via; "
        "refused (ok: false, naming the problem) when the run or step is not in a state for it.")
CMD_RETRY = _command("retry", "cmdRetry", "Retry a step", msg.RetryStepRequest, PLANNER,
                     "Retry a failed, timed-out or waiting step of a run of the subject's tenant now, optionally "
                     "with a new input (its job hash is recomputed: policy and approvals decide again); a failed "
                     "run is resumed." + _ACT)
CMD_SKIP = _command("skip", "cmdSkip", "Skip a step", msg.SkipStepRequest, PLANNER,
                    "Complete a step with a supplied output, so its dependants proceed; a failed run is resumed."
                    + _ACT)
CMD_RESUME = _command("resume", "cmdResume", "Resume a run", msg.RunControlRequest, PLANNER,
                      "Resume a failed run from its failed steps (the same run id)." + _ACT)
CMD_PAUSE = _command("pause", "cmdPause", "Pause a run", msg.RunControlRequest, PLANNER,
                     "Stop dispatching a running run's jobs (those already out finish)." + _ACT)
CMD_UNPAUSE = _command("unpause", "cmdUnpause", "Unpause a run", msg.RunControlRequest, PLANNER,
                       "Dispatch a paused run's jobs again." + _ACT)
CMD_FEEDBACK = _command("feedback", "cmdFeedback", "Feedback on a step's output", msg.FeedbackRequest, PLANNER,
                        "Rate or correct a step's output: a FeedbackGiven event bound to the output's hash, "
                        "by the subject's principal.")
_TENANT_ONLY = " Answered for the subject's tenant only (a body naming another tenant is refused)."
Q_RUNS = _query("runs", "qRuns", "Runs", msg.RunsQuery, msg.RunsReply,
                "List runs, filtered by status and workflow (up to limit); result: a list of run summaries."
                + _TENANT_ONLY)
Q_STATUS = _query("status", "qStatus", "Run status", msg.RunQuery, msg.StatusReply,
                  "One run's status and the status of each step." + _TENANT_ONLY)
Q_TIMELINE = _query("timeline", "qTimeline", "Run timeline", msg.RunQuery, msg.TimelineReply,
                    "One run's events in order; result: a list of rows, one per event." + _TENANT_ONLY)
Q_APPROVALS = _query("approvals", "qApprovals", "Pending approvals", msg.RunsQuery, msg.ApprovalsReply,
                     "Approvals waiting for a decision, oldest first, up to limit (status and workflow_id are "
                     "ignored)." + _TENANT_ONLY)
Q_USAGE = _query("usage", "qUsage", "Model usage", msg.UsageQuery, msg.UsageReply,
                 "Model calls, tokens and cost summed per run, workflow or tenant, most expensive first. The "
                 "planner asks it for tenant budgets over a time window." + _TENANT_ONLY, askers=(PLANNER,))
Q_FAILURES = _query("failures", "qFailures", "Failed runs", msg.FailuresQuery, msg.FailuresReply,
                    "A workflow's failed runs since a time, newest first, each with the step and error where it "
                    "broke (interlock run failures groups them)." + _TENANT_ONLY)

Q_SCHEDULES = _query("schedules", "qSchedules", "Workflow schedules", msg.SchedulesQuery, msg.SchedulesReply,
                     "The tenant's workflow schedules with their next tick and the run of the latest tick, by "
                     "workflow id. Answered by the planner, which keeps the schedules." + _TENANT_ONLY,
                     answerer=PLANNER)

Q_FEEDBACK = _query("feedback", "qFeedback", "Feedback", msg.FeedbackQuery, msg.FeedbackReply,
                    "Feedback given on step outputs, of one run or one workflow, oldest first, up to limit."
                    + _TENANT_ONLY)

CHANNELS: tuple[Channel, ...] = (
    TRIGGERS,
    JOBS,
    VERSIONED_JOBS,
    RESULTS,
    HEARTBEATS,
    RUN_EVENTS,
    FAST_LANE_SIGNAL,
    NOTIFICATIONS,
    ALERTS,
    CANCEL_NOTICES,
    TIMER_SCHEDULES,
    TIMERS_FIRED,
    SCHEDULE_TIMERS,
    SCHEDULE_TICKS,
    DEAD_LETTERS,
    JS_API_AUDIT,
    ADMIN_AUDIT,
    STREAM_ACTIONS,
    SEALS,
    CMD_APPROVE,
    CMD_REJECT,
    CMD_CANCEL,
    CMD_RETRY,
    CMD_SKIP,
    CMD_RESUME,
    CMD_PAUSE,
    CMD_UNPAUSE,
    CMD_FEEDBACK,
    Q_RUNS,
    Q_STATUS,
    Q_TIMELINE,
    Q_APPROVALS,
    Q_USAGE,
    Q_FAILURES,
    Q_SCHEDULES,
    Q_FEEDBACK,
)

# -- state kept outside subjects -----------------------------------------------------------


@dataclass(frozen=True)
class KeyValueEntry:
    bucket: str
    key: str
    value: type[msg.Message]
    description: str
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    part: str = ""
    """For a bucket holding entries of several kinds, which kind this is (one entry per kind)."""

    @property
    def name(self) -> str:
        """The bucket, with the kind of entry when it holds several (``il_gate waiting``)."""
        return f"{self.bucket} {self.part}" if self.part else self.bucket


AGENT_REGISTRY = KeyValueEntry(
    bucket=s.AGENTS_BUCKET,
    key="{tenant}.{topic}.{worker_id}",
    value=msg.AgentRegistration,
    description="Agent registry: a worker puts its registration (with its tenant) when it starts and refreshes "
                "last_heartbeat "
                "while it runs (the bucket drops entries not written for a day); it should delete its entry "
                "on a clean shutdown.",
    writers=(WORKER,),
    readers=(CLIENT,),
)

API_KEYS = KeyValueEntry(
    bucket=s.APIKEYS_BUCKET,
    key="{key_id}",
    value=msg.ApiKeyRecord,
    description="HTTP API keys: `interlock apikeys create` and the api service's key administration put a record "
                "(tenant, role, principal, the key's SHA-256, never the key); the api service reads it to check "
                "each request's X-API-Key. Only the api service's and admin credentials may read or write it.",
    writers=(CLIENT,),
    readers=(CLIENT,),
)

DEAD_LETTER_STATUS = KeyValueEntry(
    bucket=s.DLQ_STATUS_BUCKET,
    key="{seq} (the dead letter's stream sequence in IL_DLQ)",
    value=msg.DeadLetterStatus,
    description="What operators did about each dead letter (interlock dlq resolve|replay): every action, oldest "
                "first, updated with compare-and-set; the dead letters themselves stay in IL_DLQ.",
    writers=(OPERATOR,),
    readers=(OPERATOR,),
)

RESULT_CACHE = KeyValueEntry(
    bucket=s.CACHE_BUCKET,
    key="{tenant}.{digest} (sha256 of the step's rendered cache key and job hash)",
    value=msg.CacheEntry,
    description="The result cache (a step's cache: key and ttl): the dispatcher puts a successful job's output, "
                "and before dispatching a released job whose step has cache: it reads the entry and, when it is "
                "the tenant's, for the same job hash and key and not expired, records StepCacheHit and the "
                "output instead of a job. Only the dispatcher and admin may read or write it.",
    writers=(DISPATCHER,),
    readers=(DISPATCHER,),
)

WORKLOAD_GATE = KeyValueEntry(
    bucket=s.GATE_BUCKET,
    key="{kind}.{scope}.{digest} (subjects.gate_key: concurrency.topic.llm…, rate.tenant.acme…)",
    value=msg.GateScope,
    description="Workload limits (concurrency, rate): the jobs holding a slot and a rate limit's tokens, updated "
                "with compare-and-set by every dispatcher copy, so a limit holds across copies, kills and restarts. "
                "Internal to the dispatcher.",
    writers=(DISPATCHER,),
    readers=(DISPATCHER,),
)

WORKLOAD_GATE_QUEUE = KeyValueEntry(
    bucket=s.GATE_BUCKET,
    key="w.{limit key}.{digest of the job id} (subjects.gate_waiter_key)",
    value=msg.GateQueued,
    part="waiting",
    description="A job waiting at a workload limit (its StepThrottled is in its run's log): put when it starts "
                "waiting, deleted once it took the slot or stopped waiting; every dispatcher copy watches these "
                "entries and ranks each limit's queue in memory. Internal to the dispatcher.",
    writers=(DISPATCHER,),
    readers=(DISPATCHER,),
)

BREAKERS = KeyValueEntry(
    bucket=s.BREAKERS_BUCKET,
    key="state.{tenant}.{topic} (the state) and log.{tenant}.{topic} (one revision per state change)",
    value=msg.BreakerState,
    description="Circuit breakers of the topics whose steps declare `breaker:`: the dispatchers count outcomes and "
                "change the state with compare-and-set, and put a BreakerChange under the log key on every state "
                "change (the key's history is the log). Read by `interlock breakers` and GET /v1/breakers.",
    writers=(DISPATCHER,),
    readers=(DISPATCHER, CLIENT),
)

ROLLOUTS = KeyValueEntry(
    bucket=s.ROLLOUTS_BUCKET,
    key="{tenant}.{topic}",
    value=msg.Rollout,
    description="Canary rollouts of agent versions: `interlock agents rollout` puts one (and aborts it); the "
                "dispatchers route by it, count each side's outcomes and promote or roll it back, with "
                "compare-and-set.",
    writers=(OPERATOR, DISPATCHER),
    readers=(DISPATCHER, CLIENT),
)

KEY_VALUE: tuple[KeyValueEntry, ...] = (AGENT_REGISTRY, DEAD_LETTER_STATUS, API_KEYS, RESULT_CACHE, BREAKERS,
                                       ROLLOUTS, WORKLOAD_GATE, WORKLOAD_GATE_QUEUE)

REPLAYABLE: tuple[Channel, ...] = (TRIGGERS, JOBS, RESULTS, HEARTBEATS, TIMERS_FIRED)
"""Channels a dead letter's original may be published to again (``interlock dlq replay``): queues
whose consumers handle a message once. Run events are not among them (a commit published again
would stand twice in the run's log), nor are requests (their requester is gone)."""


@dataclass(frozen=True)
class ObjectStore:
    name: str
    key: str
    reference: type[msg.Message]
    description: str


PAYLOADS = ObjectStore(
    name=s.PAYLOADS_OBJECT_STORE,
    key="sha256 hex digest of the content",
    reference=msg.PayloadRef,
    description="Large job inputs and outputs. A message carries a PayloadRef (input_ref / output_ref) instead "
                "of the inline value; the object holds the value's JSON.",
)

OBJECT_STORES: tuple[ObjectStore, ...] = (PAYLOADS,)


# -- every contract type -------------------------------------------------------------------
def _module_messages() -> dict[str, type[msg.Message]]:
    found: dict[str, type[msg.Message]] = {}
    for name, value in sorted(vars(msg).items()):
        if (isinstance(value, type) and issubclass(value, msg.Message) and value is not msg.Message
                and value.__module__ == msg.__name__):
            found[name] = value
    return found


MESSAGE_TYPES: Mapping[str, type[msg.Message]] = MappingProxyType({
    **_module_messages(),
    ev.EventEnvelope.__name__: ev.EventEnvelope,
    ev.Commit.__name__: ev.Commit,
})
"""Every message type (including nested ones such as PayloadRef), by name."""

EVENT_DATA_TYPES: Mapping[str, type[ev.EventData]] = MappingProxyType(dict(ev.EVENT_TYPES))
"""Every run event data type, by event type name."""


def channel(id: str) -> Channel:
    for ch in CHANNELS:
        if ch.id == id:
            return ch
    raise KeyError(id)
