"""Every NATS subject, stream, consumer and bucket name Interlock uses, declared once.

Nothing else in the code base spells a subject string: services, the worker SDK, the CLI and the
generated AsyncAPI document all read them from here.

Subject layout (``{…}`` is one token; tokens never contain dots, except job topics which may):

- ``il.evt.{tenant}.{run_id}.{writer}.{route}.{lane}``  one commit of a run's event log (stream
  ``IL_EVENTS``): the run's log is ``il.evt.{tenant}.{run_id}.>``; ``writer`` is the service that
  appended it, ``route`` who must act on it and ``lane`` (``fast`` or ``slow``, from the run's
  priority) which of the acting service's consumers gets it (:mod:`interlock.contracts.routing`),
  so each service's consumer is filtered to the commits it acts on, and high-priority runs never
  queue behind a backlog of low-priority ones
- ``il.trigger.{tenant}.{workflow_id}``   start a run (stream ``IL_TRIGGERS``)
- ``il.job.{tenant}.{topic}``             jobs for agent workers (stream ``IL_JOBS``, work queue)
- ``il.vjob.{tenant}.{version}.{topic}``  jobs for one agent version only (canary rollouts, version ranges)
- ``il.result.{tenant}.{run_id}``         job results from workers (stream ``IL_RESULTS``)
- ``il.hb.{tenant}.{run_id}``             worker heartbeats (stream ``IL_RESULTS``)
- ``il.timer.at.{kind}.{run_id}.{key}``   durable timer schedules (stream ``IL_TIMERS``)
- ``il.timer.fire.{kind}``                fired timers
- ``il.timer.at.schedule.{tenant}.{workflow_id}``  a workflow schedule's next tick (one per schedule)
- ``il.notify.{tenant}.{channel}``        notifications from notify steps (stream ``IL_NOTIFY``)
- ``il.cmd.{tenant}.{name}.{principal}``  commands (approve, reject, cancel), request-reply
- ``il.q.{tenant}.{name}``                auditor queries, request-reply
- ``il.dlq.{service}``                    dead letters (stream ``IL_DLQ``)
- ``il.control.cancel.{tenant}.{run_id}`` tells running workers their run was cancelled
- ``il.seal.{stream}``                    the auditor's signed seals of a stream (stream ``IL_SEALS``)

Every tenant-owned subject carries the tenant, and a command carries the principal who sends it:
the server lets a credential publish only its own tenant's (and own principal's) subjects, so a
service takes the tenant and the principal of a request from its subject (the ``parse_*``
functions), never from the body. Agent registry keys are ``{tenant}.{topic}.{worker_id}``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import NamedTuple

PREFIX = "il"

# -- streams -------------------------------------------------------------------------------
EVENTS_STREAM = "IL_EVENTS"
TRIGGERS_STREAM = "IL_TRIGGERS"
JOBS_STREAM = "IL_JOBS"
RESULTS_STREAM = "IL_RESULTS"
TIMERS_STREAM = "IL_TIMERS"
NOTIFY_STREAM = "IL_NOTIFY"
DLQ_STREAM = "IL_DLQ"
SEALS_STREAM = "IL_SEALS"

# -- key-value buckets and object store ----------------------------------------------------
WORKFLOWS_BUCKET = "il_workflows"  # key: {workflow_id}.{version} and {workflow_id}.latest
AGENTS_BUCKET = "il_agents"  # key: {tenant}.{topic}.{worker_id} (agent_key)
POLICIES_BUCKET = "il_policies"  # key: active (its history is the bundle history)
APPROVERS_BUCKET = "il_approvers"  # key: approver id, value: the roles they hold
DLQ_STATUS_BUCKET = "il_dlq_status"  # key: dead_letter_key(seq), value: what was done about that dead letter
KEYRING_BUCKET = "il_keyring"  # key: a signing key id (nkey public key), value: its KeyEntry
PAYLOADS_OBJECT_STORE = "il_payloads"  # large inputs and outputs, by sha256
APIKEYS_BUCKET = "il_apikeys"  # key: the API key's id; value: its tenant, role, principal and SHA-256 (never the key)
CACHE_BUCKET = "il_cache"  # key: cache_entry_key(tenant, digest); value: a CacheEntry (the result cache)
BREAKERS_BUCKET = "il_breakers"  # key: breaker_key / breaker_log_key (the log key's history is the change log)
ROLLOUTS_BUCKET = "il_rollouts"  # key: rollout_key(tenant, topic); value: the topic's canary rollout
GATE_BUCKET = "il_gate"  # key: gate_key(kind, scope): a limit's slot holders and tokens; gate_waiter_key: a waiting job

# -- wildcards a stream or consumer binds to ----------------------------------------------
EVENTS_ALL = f"{PREFIX}.evt.>"
TRIGGERS_ALL = f"{PREFIX}.trigger.>"
JOBS_ALL = f"{PREFIX}.job.>"
VERSIONED_JOBS_ALL = f"{PREFIX}.vjob.>"
RESULTS_ALL = f"{PREFIX}.result.>"
HEARTBEATS_ALL = f"{PREFIX}.hb.>"
TIMERS_SCHEDULED_ALL = f"{PREFIX}.timer.at.>"
TIMERS_FIRED_ALL = f"{PREFIX}.timer.fire.>"
NOTIFY_ALL = f"{PREFIX}.notify.>"
DLQ_ALL = f"{PREFIX}.dlq.>"
CONTROL_CANCEL_ALL = f"{PREFIX}.control.cancel.>"
SEALS_ALL = f"{PREFIX}.seal.>"

_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")
_TOPIC = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


class SubjectError(ValueError):
    """A value cannot be used as a subject token."""


def token(value: str, what: str) -> str:
    """Check that ``value`` is one subject token (no dots, spaces or wildcards)."""
    if not _TOKEN.match(value):
        raise SubjectError(f"{what} {value!r} is not a valid subject token (letters, digits, '_' and '-')")
    return value


def topic_tokens(topic: str) -> str:
    """Check a job topic: dotted tokens, no wildcards."""
    if not _TOPIC.match(topic):
        raise SubjectError(f"job topic {topic!r} must be dot-separated tokens of letters, digits, '_' or '-'")
    return topic


def run_events(tenant: str, run_id: str) -> str:
    """The name of one run's log, ``il.evt.{tenant}.{run_id}``: what commit statements, seals,
    exports and verdicts name. Its commits are stored on :func:`commit_subject` below it; read or
    condition on them with :func:`run_log`."""
    return f"{PREFIX}.evt.{token(tenant, 'tenant')}.{token(run_id, 'run id')}"


def run_log(tenant: str, run_id: str) -> str:
    """Every commit of one run (the filter for reads and the expected-sequence check)."""
    return f"{run_events(tenant, run_id)}.>"


FAST_LANE = "fast"
"""Lane of the commits of a high-priority run (``routing.lane_of``): consumed before the slow lane."""
SLOW_LANE = "slow"
"""Lane of every other run's commits."""
LANES = (FAST_LANE, SLOW_LANE)


def lane_token(lane: str) -> str:
    """Check a commit's lane token (one token; Interlock writes one of :data:`LANES`, and a commit
    in any other lane reaches only consumers of every lane, as a misleading route would)."""
    return token(lane, "lane")


def commit_subject(tenant: str, run_id: str, writer: str, route: str, lane: str = SLOW_LANE) -> str:
    """Where a commit is appended: below its run's log, with who wrote it, who must act on it and
    in which lane (the run's, :func:`interlock.contracts.routing.lane_of`)."""
    return f"{run_events(tenant, run_id)}.{token(writer, 'writer')}.{token(route, 'route')}.{lane_token(lane)}"


FAST_LANE_COMMITS = f"{PREFIX}.evt.*.*.*.*.{FAST_LANE}"
"""Every fast-lane commit as it is appended (a core subscription, no consumer): the sign that a
high-priority run is moving, on which every service holds its slow-lane work (runtime/lanes.py)."""


def tenant_events(tenant: str) -> str:
    return f"{PREFIX}.evt.{token(tenant, 'tenant')}.>"


def trigger(tenant: str, workflow_id: str) -> str:
    """Start a run of ``workflow_id`` in ``tenant`` (the body is a Trigger)."""
    return f"{PREFIX}.trigger.{token(tenant, 'tenant')}.{token(workflow_id, 'workflow id')}"


def is_trigger_subject(subject: str) -> bool:
    """True for ``trigger(tenant, workflow_id)`` subjects (and anything else under ``il.trigger.``),
    whose body is a Trigger; any other subject in the triggers stream is a workflow's declared
    trigger subject, whose body is the run's input."""
    return subject.startswith(f"{PREFIX}.trigger.")


def parse_trigger(subject: str) -> tuple[str, str]:
    """``il.trigger.{tenant}.{workflow_id}`` -> (tenant, workflow_id)."""
    tenant, workflow_id = _parse(subject, ("trigger",), 2, "trigger", "il.trigger.{tenant}.{workflow_id}")
    return tenant, workflow_id


def job(tenant: str, topic: str) -> str:
    """A job for ``tenant``'s workers of ``topic``."""
    return f"{PREFIX}.job.{token(tenant, 'tenant')}.{topic_tokens(topic)}"


def tenant_jobs(tenant: str) -> str:
    """Every job of one tenant."""
    return f"{PREFIX}.job.{token(tenant, 'tenant')}.>"


def parse_job(subject: str) -> tuple[str, str]:
    """``il.job.{tenant}.{topic}`` -> (tenant, topic); the topic may have several tokens."""
    parts = subject.split(".")
    if len(parts) < 4 or parts[0] != PREFIX or parts[1] != "job":
        raise SubjectError(f"{subject!r} is not a job subject (expected il.job.{{tenant}}.{{topic}})")
    tenant, topic = parts[2], ".".join(parts[3:])
    return _checked(lambda v: token(v, "tenant"), tenant, subject), _checked(topic_tokens, topic, subject)


def version_token(version: str) -> str:
    """An agent version as one subject token: '.' becomes '_' and anything else outside
    letters, digits, '_' and '-' becomes '-' (versions such as ``2.1.0``, ``2.0+build``).
    Two versions that differ only there (``2.1`` and ``2_1``) share a token: the dispatcher
    refuses to route between such a pair."""
    if not version:
        raise SubjectError("an agent version must not be empty")
    return re.sub(r"[^A-Za-z0-9_-]", "-", version.replace(".", "_"))


def versioned_job(tenant: str, version: str, topic: str) -> str:
    """A job for ``tenant``'s workers of ``topic`` that run agent ``version`` only (the worker
    SDK subscribes to its own version's subject beside the topic's)."""
    return f"{PREFIX}.vjob.{token(tenant, 'tenant')}.{version_token(version)}.{topic_tokens(topic)}"


def tenant_versioned_jobs(tenant: str) -> str:
    return f"{PREFIX}.vjob.{token(tenant, 'tenant')}.>"


VERSION_SLOTS = 4
"""Versioned consumers per tenant and topic: how many agent versions of one topic can be served
(and routed to) at once. A slot held by a version nobody serves is freed after
``protocol.VERSION_SLOT_IDLE_S``."""


def worker_version_consumer(tenant: str, topic: str, slot: int) -> str:
    """Durable consumer number ``slot`` of one tenant's topic for versioned jobs. A worker takes
    the slot whose filter is its version's subject, or a free one (its filter then fixes the
    version): names are known in advance, so a worker credential can be held to them."""
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < VERSION_SLOTS:
        raise SubjectError(f"version slot {slot!r} is not a whole number in 0..{VERSION_SLOTS - 1}")
    return f"{worker_consumer(tenant, topic)}_v{slot}"


def breaker_key(tenant: str, topic: str) -> str:
    """The circuit breaker of ``tenant``'s jobs of ``topic`` in ``BREAKERS_BUCKET`` (its state)."""
    return f"state.{token(tenant, 'tenant')}.{topic_tokens(topic)}"


def breaker_log_key(tenant: str, topic: str) -> str:
    """The breaker's change log: one revision per state change (the key's history)."""
    return f"log.{token(tenant, 'tenant')}.{topic_tokens(topic)}"


def parse_breaker_key(key: str) -> tuple[str, str]:
    """``state.{tenant}.{topic}`` -> (tenant, topic)."""
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "state":
        raise SubjectError(f"{key!r} is not a breaker key (expected state.{{tenant}}.{{topic}})")
    return _checked(lambda v: token(v, "tenant"), parts[1], key), _checked(topic_tokens, ".".join(parts[2:]), key)


def rollout_key(tenant: str, topic: str) -> str:
    """The canary rollout of ``tenant``'s agents of ``topic`` in ``ROLLOUTS_BUCKET``."""
    return f"{token(tenant, 'tenant')}.{topic_tokens(topic)}"


def result(tenant: str, run_id: str) -> str:
    return f"{PREFIX}.result.{token(tenant, 'tenant')}.{token(run_id, 'run id')}"


def heartbeat(tenant: str, run_id: str) -> str:
    return f"{PREFIX}.hb.{token(tenant, 'tenant')}.{token(run_id, 'run id')}"


def timer_schedule(kind: str, run_id: str, key: str) -> str:
    return f"{PREFIX}.timer.at.{token(kind, 'timer kind')}.{token(run_id, 'run id')}.{token(key, 'timer key')}"


def timer_fired(kind: str) -> str:
    return f"{PREFIX}.timer.fire.{token(kind, 'timer kind')}"


SCHEDULE_TIMER_KIND = "schedule"
"""The timer kind of workflow schedules (``schedule:`` in a workflow): one pending tick per schedule."""


def schedule_timer(tenant: str, workflow_id: str) -> str:
    """The one pending tick of ``workflow_id``'s schedule in ``tenant``: publishing here replaces it
    (the server keeps one schedule per subject), a message without a schedule header cancels it."""
    return timer_schedule(SCHEDULE_TIMER_KIND, token(tenant, "tenant"), token(workflow_id, "workflow id"))


def schedule_fired() -> str:
    """Where the server publishes a schedule's tick when it comes due (the planner consumes it)."""
    return timer_fired(SCHEDULE_TIMER_KIND)


def notify(tenant: str, channel: str) -> str:
    return f"{PREFIX}.notify.{token(tenant, 'tenant')}.{token(channel, 'channel')}"


ALERTS_CHANNEL = "alerts"  # reserved: a workflow's notify step may not use it
SYSTEM_TENANT = "_all"  # alerts about the whole installation (dead-letter growth)


def alerts(tenant: str) -> str:
    """Where the auditor publishes a tenant's alerts (in IL_NOTIFY, beside notifications)."""
    return notify(tenant, ALERTS_CHANNEL)


def command(tenant: str, name: str, principal: str) -> str:
    """Command ``name`` (approve, reject, cancel) sent by ``principal`` for ``tenant``: the server
    lets a credential send only its own; the service reads who sent it from here."""
    return f"{PREFIX}.cmd.{token(tenant, 'tenant')}.{token(name, 'command')}.{token(principal, 'principal')}"


def commands(name: str) -> str:
    """What the service answering command ``name`` subscribes to: every tenant and principal."""
    return f"{PREFIX}.cmd.*.{token(name, 'command')}.*"


def parse_command(subject: str) -> tuple[str, str, str]:
    """``il.cmd.{tenant}.{name}.{principal}`` -> (tenant, name, principal)."""
    tenant, name, principal = _parse(subject, ("cmd",), 3, "command", "il.cmd.{tenant}.{name}.{principal}")
    return tenant, name, principal


def query(tenant: str, name: str) -> str:
    """Query ``name`` (runs, status, timeline, approvals), answered for ``tenant`` only."""
    return f"{PREFIX}.q.{token(tenant, 'tenant')}.{token(name, 'query')}"


def queries(name: str) -> str:
    """What the auditor subscribes to for query ``name``: every tenant."""
    return f"{PREFIX}.q.*.{token(name, 'query')}"


def parse_query(subject: str) -> tuple[str, str]:
    """``il.q.{tenant}.{name}`` -> (tenant, name)."""
    tenant, name = _parse(subject, ("q",), 2, "query", "il.q.{tenant}.{name}")
    return tenant, name


def dead_letter(service: str) -> str:
    return f"{PREFIX}.dlq.{token(service, 'service')}"


def dead_letter_key(seq: int) -> str:
    """A dead letter's key in bucket ``DLQ_STATUS_BUCKET``: its ``IL_DLQ`` stream sequence (its id)."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise SubjectError(f"dead letter id {seq!r} is not a stream sequence (a whole number from 1)")
    return str(seq)


def seals(stream: str) -> str:
    """The chain of seals of ``stream`` (one subject per sealed stream, in ``SEALS_STREAM``)."""
    return f"{PREFIX}.seal.{token(stream, 'stream')}"


def control_cancel(tenant: str, run_id: str) -> str:
    return f"{PREFIX}.control.cancel.{token(tenant, 'tenant')}.{token(run_id, 'run id')}"


def tenant_control_cancel(tenant: str) -> str:
    """Cancel notices of one tenant's runs (what that tenant's workers subscribe to)."""
    return f"{PREFIX}.control.cancel.{token(tenant, 'tenant')}.*"


def _checked(check: Callable[[str], str], value: str, subject: str) -> str:
    try:
        return check(value)
    except SubjectError as e:
        raise SubjectError(f"{subject!r}: {e}") from None


def _parse(subject: str, kind: tuple[str, ...], count: int, what: str, layout: str) -> list[str]:
    """The ``count`` tokens after ``il.{kind}`` in ``subject``, each a valid token."""
    parts = subject.split(".")
    head = [PREFIX, *kind]
    if parts[:len(head)] != head or len(parts) != len(head) + count:
        raise SubjectError(f"{subject!r} is not a {what} subject (expected {layout})")
    names = re.findall(r"\{(\w+)\}", layout)
    values = parts[len(head):]
    for value, name in zip(values, names, strict=True):
        if not _TOKEN.match(value):
            raise SubjectError(f"{subject!r}: {name.replace('_', ' ')} {value!r} is not a valid subject token "
                               f"(letters, digits, '_' and '-')")
    return values


def parse_run_events(subject: str) -> tuple[str, str]:
    """A commit's subject ``il.evt.{tenant}.{run_id}.{writer}.{route}.{lane}`` (or one appended
    before lanes existed, without the lane, or a run log's name ``il.evt.{tenant}.{run_id}``)
    -> (tenant, run_id)."""
    dots = subject.count(".")
    if dots == 3:
        tenant, run_id = _parse(subject, ("evt",), 2, "run event", "il.evt.{tenant}.{run_id}")
        return tenant, run_id
    if dots == 5:
        tenant, run_id, _, _ = _parse(subject, ("evt",), 4, "run event", "il.evt.{tenant}.{run_id}.{writer}.{route}")
        return tenant, run_id
    tenant, run_id, _, _, _ = _parse(subject, ("evt",), 5, "run event",
                                     "il.evt.{tenant}.{run_id}.{writer}.{route}.{lane}")
    return tenant, run_id


def lane_of_subject(subject: str) -> str:
    """The lane of a commit's subject (a commit appended before lanes existed is slow)."""
    parse_run_events(subject)
    parts = subject.split(".")
    return parts[6] if len(parts) == 7 else SLOW_LANE


def log_of(subject: str) -> str:
    """The run log a commit's subject belongs to (``il.evt.{tenant}.{run_id}``)."""
    return run_events(*parse_run_events(subject))


_PER_RUN = ("evt", "result", "hb")


def run_of(subject: str) -> tuple[str, str] | None:
    """(tenant, run_id) of a per-run subject (run events, results, heartbeats), else None."""
    parts = subject.split(".")
    if (len(parts) == 4 or (len(parts) in (6, 7) and parts[1] == "evt")) and parts[0] == PREFIX \
            and parts[1] in _PER_RUN:
        return parts[2], parts[3]
    return None


def worker_consumer(tenant: str, topic: str) -> str:
    """Durable consumer shared by every worker copy of one tenant's topic.

    The readable part alone is ambiguous (``_`` may occur in tenants and topics), so a digest
    of the exact pair follows: two (tenant, topic) pairs never share a consumer.
    """
    readable = f"{token(tenant, 'tenant')}_{topic_tokens(topic).replace('.', '_')}"
    digest = hashlib.sha256(f"{tenant}\n{topic}".encode()).hexdigest()[:16]
    return f"worker_{readable}_{digest}"


def agent_key(tenant: str, topic: str, worker_id: str) -> str:
    """A worker's key in the agent registry (bucket ``AGENTS_BUCKET``)."""
    return f"{token(tenant, 'tenant')}.{topic_tokens(topic)}.{token(worker_id, 'worker id')}"


def cache_entry_key(tenant: str, digest: str) -> str:
    """A result's key in the result cache (bucket ``CACHE_BUCKET``): the tenant first, so no
    lookup of one tenant can ever name another's entry; ``digest`` (hex) covers the cache key and
    the job hash."""
    return f"{token(tenant, 'tenant')}.{token(digest, 'cache digest')}"


def gate_key(kind: str, scope: str) -> str:
    """The key of one workload limit in bucket ``GATE_BUCKET`` (``concurrency.topic.llm``).

    ``scope`` may hold anything (a value computed from a run's input): characters a key may not
    hold are replaced and a digest of the exact scope follows, so two scopes never share a key."""
    readable = re.sub(r"[^A-Za-z0-9_=-]", "_", scope)[:64]
    digest = hashlib.sha256(scope.encode()).hexdigest()[:12]
    return f"{token(kind, 'gate kind')}.{readable}.{digest}"


GATE_WAITER_PREFIX = "w"


def gate_waiter_key(limit_key: str, job: str) -> str:
    """The entry of a job that waits at one limit in ``GATE_BUCKET`` (``w.{limit key}.{digest}``):
    one per job and limit, so a job starting or ending its wait writes only its own entry."""
    digest = hashlib.sha256(job.encode()).hexdigest()[:24]
    return f"{GATE_WAITER_PREFIX}.{limit_key}.{digest}"


def is_gate_waiter_key(key: str) -> bool:
    """Whether a key of ``GATE_BUCKET`` is a waiting job's entry (else a limit's state)."""
    return key.startswith(GATE_WAITER_PREFIX + ".")


# -- the JetStream API (subjects of the server's own API that Interlock calls directly) -------
JS_API_PREFIX = "$JS.API"
JS_API_INFO = f"{JS_API_PREFIX}.INFO"


def js_direct_get(stream: str) -> str:
    """Batched direct get of a stream's messages (``allow_direct`` streams)."""
    return f"{JS_API_PREFIX}.DIRECT.GET.{token(stream, 'stream')}"


def js_consumer_next(stream: str, durable: str) -> str:
    """Pull request for the next messages of a durable consumer."""
    return f"{JS_API_PREFIX}.CONSUMER.MSG.NEXT.{token(stream, 'stream')}.{token(durable, 'consumer')}"


CLUSTER_PROBE = f"{PREFIX}.cluster.probe"  # a throwaway stream's subject: is JetStream ready?


# -- the record of changes to streams (issue 10) ---------------------------------------------
ADMIN_AUDIT_STREAM = "IL_ADMIN_AUDIT"
"""Who created, updated, purged or deleted which stream: the auditor's ``il.admin.audit`` records
and the server's own stream action advisories (a year, no purge, no message delete)."""

ADMIN_AUDIT = f"{PREFIX}.admin.audit"
"""The auditor service publishes here (into ``IL_ADMIN_AUDIT``) each API audit advisory of a
request that changes a stream or the account: who asked, the request, the answer."""


def admin_audit() -> str:
    """The auditor's record of one change (as a function, for a catalog channel's pattern)."""
    return ADMIN_AUDIT


JS_API_AUDIT = "$JS.EVENT.ADVISORY.API"
"""nats-server publishes a ``JSAPIAudit`` advisory here, in the caller's account, for every
JetStream API request it answers, reads (INFO, LIST) included: far too many to keep, so no stream
captures this subject; the auditor service subscribes and keeps the changes."""

JS_API_AUDIT_TYPE = "io.nats.jetstream.advisory.v1.api_audit"


def js_api_audit() -> str:
    """The API audit advisory subject (as a function, for a catalog channel's pattern)."""
    return JS_API_AUDIT


JS_STREAM_ACTION_PREFIX = "$JS.EVENT.ADVISORY.STREAM"
JS_STREAM_ACTIONS = {"CREATED": "create", "UPDATED": "modify", "DELETED": "delete"}
"""The server's stream action advisories: subject token -> the advisory's ``action``. The server
publishes one (``JSStreamActionAdvisory``, in the stream's account) whenever a stream is created,
updated or deleted, whoever asked and whether or not an Interlock service runs; it names no
client. A purge or a message delete has no advisory of its own (only the API audit)."""

JS_STREAM_ACTION_TYPE = "io.nats.jetstream.advisory.v1.stream_action"


def js_stream_action(event: str, stream: str) -> str:
    """``$JS.EVENT.ADVISORY.STREAM.{event}.{stream}``, ``event`` one of :data:`JS_STREAM_ACTIONS`."""
    def one(value: str, what: str) -> str:
        return value if value in ("*", ">") else token(value, what)
    return f"{JS_STREAM_ACTION_PREFIX}.{one(event, 'stream action')}.{one(stream, 'stream')}"


JS_STREAM_ACTION_SUBJECTS = tuple(js_stream_action(event, "*") for event in JS_STREAM_ACTIONS)
"""What ``IL_ADMIN_AUDIT`` captures of the server's advisories (not SNAPSHOT_*, LEADER_ELECTED, …)."""

STREAM_CHANGES = ("CREATE", "UPDATE", "DELETE", "PURGE", "MSG.DELETE", "RESTORE")
"""``$JS.API.STREAM.{action}.{stream}`` actions that change a stream's configuration or messages."""
CONSUMER_CHANGES = ("CREATE", "DURABLE.CREATE", "DELETE", "PAUSE")
"""``$JS.API.CONSUMER.{action}.{stream}.{consumer}…`` actions that add, change or remove a consumer."""


class JsApiCall(NamedTuple):
    """What a JetStream API subject asks for: ``kind`` (STREAM, CONSUMER, ACCOUNT), the action,
    the stream (or account) and consumer it names."""

    kind: str
    action: str
    stream: str = ""
    consumer: str = ""

    @property
    def changes(self) -> bool:
        """True for a request that changes a stream, consumer or the account (not a read such as INFO)."""
        if self.kind == "STREAM":
            return self.action in STREAM_CHANGES
        if self.kind == "CONSUMER":
            return self.action in CONSUMER_CHANGES
        return self.kind == "ACCOUNT" and self.action == "PURGE"


def parse_js_api(subject: str) -> JsApiCall | None:
    """``$JS.API.STREAM.UPDATE.IL_EVENTS`` -> ``JsApiCall("STREAM", "UPDATE", "IL_EVENTS")``;
    None for a subject outside the JetStream API."""
    prefix = JS_API_PREFIX + "."
    if not subject.startswith(prefix):
        return None
    tokens = subject[len(prefix):].split(".")
    kind, rest = tokens[0], tokens[1:]
    if not rest:
        return JsApiCall(kind, "")
    # two-token actions: STREAM.MSG.DELETE, CONSUMER.DURABLE.CREATE, STREAM.LEADER.STEPDOWN, …
    width = 2 if len(rest) > 1 and rest[0] in ("MSG", "DURABLE", "LEADER", "PEER") else 1
    action, names = ".".join(rest[:width]), rest[width:]
    stream = names[0] if names else ""
    consumer = names[1] if kind == "CONSUMER" and len(names) > 1 else ""
    return JsApiCall(kind, action, stream, consumer)
