"""The client: everything a tool does with a running Interlock, over NATS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import InvalidKeyError
from pydantic import BaseModel, ValidationError

from interlock.client import _policy, _workload
from interlock.client._errors import ClientError, NotFound, Refused, Unavailable
from interlock.client._settings import ClientSettings
from interlock.client._types import (
    TERMINAL_EVENTS,
    DeadLetterEntry,
    PendingApproval,
    PolicyDecision,
    PolicyRevision,
    PolicySimulation,
    RerunPlan,
)
from interlock.contracts import events as ev
from interlock.contracts import headers as h
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.contracts.authorship import approval_bytes
from interlock.contracts.messages import (
    PRIORITY_MAX,
    PRIORITY_MIN,
    AgentRegistration,
    Alert,
    ApiKeyRecord,
    ApprovalDecision,
    ApprovalStatement,
    BreakerChange,
    BreakerState,
    CancelRequest,
    CommandReply,
    DeadLetter,
    DeadLetterAction,
    DeadLetterStatus,
    FailuresQuery,
    FeedbackQuery,
    FeedbackRequest,
    QueryReply,
    RetryStepRequest,
    Rollout,
    RunControlRequest,
    RunQuery,
    RunsQuery,
    ScheduleRow,
    SchedulesQuery,
    SignedApproval,
    SkipStepRequest,
    Trigger,
    UsageQuery,
)
from interlock.core.auditexport import export_lines
from interlock.core.eventstore import (
    EventStore,
    EventStoreError,
    JetStreamRecorder,
    RunNotFound,
    SlotsBusy,
    StoredCommit,
)
from interlock.core.eventstore.recorder import stored_commit
from interlock.core.ids import run_id_for
from interlock.core.run import Run
from interlock.core.rundiff import FailureGroup, RunDiff, diff_runs, group_failures
from interlock.core.seal import Seal
from interlock.core.sealed import SealedError
from interlock.core.topology import provision
from interlock.core.verify import VerifyReport, verify_run
from interlock.core.workflow import Workflow, load_workflow
from interlock.identity import Keyring, Signer, creds_inbox_prefix, creds_permissions
from interlock.runtime import seals as _seals
from interlock.runtime import tls as _tls
from interlock.runtime.apikeys import ApiKeyError, ApiKeyStore
from interlock.runtime.connect import ConnectRefused, NoServerAnswered, connect, url_file
from interlock.runtime.datakeys import DataKeyError, PayloadSealer
from interlock.runtime.deadletter import CannotReplay, read_entry, replay_msg_id, replay_of, with_action
from interlock.runtime.kvkeys import matching_keys
from interlock.runtime.policy import ACTIVE as POLICY_KEY
from interlock.runtime.publish import publish
from interlock.runtime.registry import VersionConflict, WorkflowNotFound, WorkflowRegistry
from interlock.runtime.seals import SealReport
from interlock.runtime.signing import read_keyring, signing_enabled

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)


class _RunsCursor:
    """A runs page cursor: the last row's (started_at, run_id), URL-safe base64, opaque to callers."""

    @staticmethod
    def encode(started_at: str, run_id: str) -> str:
        return base64.urlsafe_b64encode(f"{started_at}\n{run_id}".encode()).decode().rstrip("=")

    @staticmethod
    def decode(cursor: str) -> tuple[str, str]:
        try:
            text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            started_at, run_id = text.split("\n")
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"cursor {cursor!r} is not one this API returned") from None
        return started_at, run_id


_runs_cursor = _RunsCursor()
OnEvent = Callable[[dict[str, Any]], Awaitable[None] | None]
WORKFLOW_CHECK_S = 5.0  # submit_run: how long a workflow seen to exist is not looked up again
ENV_NATS_URL = "INTERLOCK_NATS_URL"
KEEP_INPUT: Any = object()
"""Default of :meth:`Client.retry_step`'s ``input`` (and ``give_feedback``'s ``correction``): none given
(``None`` is a JSON null, a value like any other)."""
REQUEST_TIMEOUT = 5.0  # how long a service may take to answer, and how long we wait for one to appear


def _priority(priority: int | None) -> int | None:
    """A run priority as asked for, checked here so a bad one is a clear error, not a dead letter."""
    if priority is not None and not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ClientError(f"priority must be {PRIORITY_MIN} (lowest) to {PRIORITY_MAX} (highest), not {priority}")
    return priority


def _tls_overrides(ca: str | Path | None, cert: str | Path | None, key: str | Path | None,
                   hostname: str | None) -> dict[str, object]:
    """TLS: the ``Client.connect`` arguments that were given, as settings overrides."""
    given = {"tls_ca": ca, "tls_cert": cert, "tls_key": key}
    overrides: dict[str, object] = {k: Path(v) for k, v in given.items() if v is not None}
    if hostname is not None:
        overrides["tls_hostname"] = hostname
    return overrides


def _alert_message(seq: int, data: bytes, headers: dict[str, str] | None, at: float | None) -> StoredCommit:
    """A message of the alerts subject as a one-entry 'commit' (undecodable bytes: an empty one)."""
    try:
        value = json.loads(data)
    except ValueError:
        return StoredCommit(seq, [])
    return StoredCommit(seq, [value] if isinstance(value, dict) else [])


def _read_slots(creds: Path | None) -> tuple[str, ...]:
    """The consumers through which a credential that may not direct-get the run logs (a person's:
    a batch get cannot be held to a tenant) reads them: its own slots. Empty: direct gets."""
    if creds is None or creds_permissions(creds).allows_publish(s.js_direct_get(s.EVENTS_STREAM)):
        return ()
    owner = creds_inbox_prefix(creds).removeprefix(f"{p.INBOX_ROOT}.")
    return tuple(p.principal_consumer(owner, i) for i in range(p.PRINCIPAL_CONSUMER_SLOTS))


class Client:
    """One connection to Interlock. Create with :meth:`connect`; close with :meth:`close` (or
    ``async with``). Safe for concurrent tasks."""

    def __init__(self, nc: NATS, *, url: str, url_source: str, tenant: str, name: str,
                 principal: str = "anonymous") -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.url = url
        self.url_source = url_source
        self.tenant = tenant
        self.principal = s.token(principal, "principal")
        """Who this client's commands are from: the principal in their subjects (the approver of
        its decisions, who cancelled)."""
        self.name = name
        self._store = EventStore(nc, self.js, service=name)
        self._registry = WorkflowRegistry(self.js)
        self._provisioned = False
        self.creds: Path | None = None
        """The credential this client connected with (None: anonymous)."""
        self.creds_source = "none"
        self._keys = ApiKeyStore(self.js)  # no I/O until used; shared by with_tenant views (one cache)
        self._known_workflows: dict[tuple[str, str | None], float] = {}
        self.request_timeout = REQUEST_TIMEOUT
        """Seconds a service may take to answer a request, and to appear if none is subscribed."""
        self._sealer: PayloadSealer | None = None

    # -- connection --------------------------------------------------------------------------
    @classmethod
    async def connect(cls, url: str | None = None, *, creds: str | Path | None = None, tenant: str | None = None,
                      principal: str | None = None, name: str = "interlock-cli", patient: bool = False,
                      tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                      tls_key: str | Path | None = None, tls_hostname: str | None = None,
                      url_from: str = "argument") -> Client:
        """Connect to NATS. ``url`` None: ``INTERLOCK_NATS_URL``, else ``.interlock/nats.url``, else
        the default; ``tenant`` None: ``INTERLOCK_TENANT``; ``creds`` None: ``INTERLOCK_CREDS``;
        ``principal`` None: ``INTERLOCK_PRINCIPAL``, else the creds file's user name, else ``$USER``.
        ``patient``: keep reconnecting for as long as the client lives (a cluster's failover).
        ``tls_*`` None: ``INTERLOCK_TLS_CA``, ``…_CERT``, ``…_KEY``, ``…_HOSTNAME`` (a ``tls://`` URL
        without a CA trusts the system's store). ``url_from``: what to call a given ``url``'s source
        in messages (the CLI: ``--nats``). Not ``patient``: when no server answers within
        ``INTERLOCK_CONNECT_TIMEOUT`` (1.2 s) the connect fails, naming the URL and its source."""
        explicit = Path(creds) if creds is not None else None
        settings = ClientSettings.load(tenant=tenant, creds=explicit, principal=principal,
                                       **_tls_overrides(tls_ca, tls_cert, tls_key, tls_hostname))
        target, source = settings.resolve_url(url, url_from)
        creds_file, creds_source = settings.resolve_creds(explicit)
        who = settings.resolve_principal(creds_file)
        if source == "default":  # say why: nothing named a server, and the default may be someone else's
            source = f"default: no {url_from}, {ENV_NATS_URL} or {url_file()}"
        log.info("connecting to %s (from %s) as %s (from %s), principal %s", target, source,
                 creds_file or "anonymous (no creds)", creds_source, who)

        async def on_error(e: Exception) -> None:  # reconnects are reported by the calls that fail
            pass

        try:  # creds: the server refuses none or a wrong one at once; TLS: a tls:// URL or INTERLOCK_TLS_*
            nc = await connect(target, creds=creds_file, name=name, patient=patient, error_cb=on_error, tls=settings,
                               within=None if patient else settings.connect_timeout)
        except NoServerAnswered as e:
            raise Unavailable(f"{e} (URL from {source}); start the stack with `interlock up`, or name the server "
                              f"with --nats or INTERLOCK_NATS_URL") from None
        except ConnectRefused as e:
            raise Unavailable(f"{e} (URL from {source})") from None
        except _tls.TlsError as e:
            raise Unavailable(f"{e} (URL from {source})") from None
        except (OSError, nats.errors.Error, TimeoutError) as e:
            detail = str(e) or type(e).__name__
            raise Unavailable(f"cannot reach NATS at {target} (from {source}): {detail}; start the stack with "
                              f"`interlock up` or set INTERLOCK_NATS_URL") from None
        client = cls(nc, url=target, url_source=source, tenant=settings.tenant, name=name, principal=who)
        client.creds = creds_file
        client.creds_source = creds_source
        client._store = EventStore(nc, client.js, service=name, slots=_read_slots(creds_file))
        client._sealer = PayloadSealer.from_settings(settings)
        return client

    def with_tenant(self, tenant: str, principal: str | None = None) -> Client:
        """The same connection acting for another tenant (closing either closes the connection);
        with ``principal``, its commands are sent as that principal (a credential that may: the
        api service's, for its keys' principals)."""
        view = copy.copy(self)
        view.tenant = s.token(tenant, "tenant")
        if principal is not None:
            view.principal = s.token(principal, "principal")
        return view

    async def close(self) -> None:
        """Close the connection (pending requests fail)."""
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _provision(self) -> None:
        # streams and buckets exist once anything ran; commands that write KV make sure of it
        # (only a credential that may create streams does: whoever bootstrapped already did)
        if not self._provisioned:
            create = p.js_stream("CREATE", s.EVENTS_STREAM)
            if self.creds is None or creds_permissions(self.creds).allows_publish(create):
                await provision(self.js)
            self._provisioned = True

    def _may_publish(self, subject: str, action: str) -> None:
        """Refuse at once, naming principal, action and permission, what this client's credential
        may not publish (the server would drop it silently: a timeout, or nothing at all)."""
        if self.creds is not None and not creds_permissions(self.creds).allows_publish(subject):
            raise Refused(f"{self.principal} ({self.creds}) may not {action}: the credential lacks permission to "
                          f"publish to {subject!r}")

    async def _request(self, subject: str, message: BaseModel, reply_type: type[R], what: str) -> R:
        timeout = self.request_timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = await self.nc.request(subject, message.model_dump_json().encode(), timeout=timeout)
                return reply_type.model_validate_json(msg.data)
            except nats.errors.NoRespondersError:
                # a service starting (or restarting) has not subscribed yet: ask again for a while
                if time.monotonic() > deadline:
                    raise Unavailable(f"no {what} service is running (nobody answers on {subject})") from None
                await asyncio.sleep(0.2)
            except nats.errors.TimeoutError:
                raise Unavailable(f"the {what} service did not answer on {subject} within {timeout:g}s") from None

    async def _command(self, subject: str, message: BaseModel, what: str) -> CommandReply:
        tenant, name, _ = s.parse_command(subject)
        self._may_publish(subject, f"{name} in tenant {tenant}")
        reply = await self._request(subject, message, CommandReply, what)
        if not reply.ok:
            raise Refused(f"refused: {reply.error or 'no reason given'}")
        return reply

    async def _query(self, subject: str, message: BaseModel, service: str = "auditor") -> Any:
        tenant, name = s.parse_query(subject)
        self._may_publish(subject, f"query {name} of tenant {tenant}")
        reply = await self._request(subject, message, QueryReply, service)
        if not reply.ok:
            error = reply.error or "query failed"
            raise (NotFound if error.endswith("not found") else ClientError)(error)
        return reply.result

    # -- workflows ---------------------------------------------------------------------------
    async def apply_workflow(self, text: str, filename: str | None = None,
                             files: Mapping[str, str] | None = None) -> tuple[Workflow, bool]:
        """Register a workflow version from its YAML text: (workflow, created). ``files``: the
        guard rule files it names (relative path -> text; ``workflow_files(path)`` reads them
        beside a workflow file), registered with the version. Raises ``WorkflowInvalid`` listing
        every problem, or :class:`Refused` when the version exists with different content."""
        await self._provision()
        workflow = load_workflow(text, filename=filename, files=files or {})
        await self._may_add_trigger_subjects(workflow)
        self._may_schedule(workflow)
        try:
            return await self._registry.apply(text, filename=filename, files=files)
        except VersionConflict as e:
            raise Refused(str(e)) from None

    def _may_schedule(self, workflow: Workflow) -> None:
        """Refuse a schedule that would start runs in another tenant than this client's: whoever
        applies a workflow (an admin, an API admin key) acts for one tenant, and so do its schedules."""
        schedule = workflow.schedule
        if schedule is not None and schedule.tenant != self.tenant:
            raise Refused(f"workflow {workflow.id}: schedule.tenant is {schedule.tenant!r}, but you act for tenant "
                          f"{self.tenant!r}; a schedule starts runs in the tenant of whoever applies it (apply it "
                          f"as a principal of tenant {schedule.tenant!r}, e.g. with --tenant {schedule.tenant})")

    async def _may_add_trigger_subjects(self, workflow: Workflow) -> None:
        """Refuse, before anything is written, a workflow whose own trigger subjects are not on
        the triggers stream yet when this credential may not add them (a stream change: admin)."""
        extra = [subject for subject in workflow.triggers if not s.is_trigger_subject(subject)]
        if not extra or self.creds is None:
            return
        allowed = creds_permissions(self.creds)
        if allowed.allows_publish(p.js_stream("UPDATE", s.TRIGGERS_STREAM)):
            return
        missing = extra
        if allowed.allows_publish(p.js_stream_info(s.TRIGGERS_STREAM)):
            info = await self.js.stream_info(s.TRIGGERS_STREAM)
            missing = [subject for subject in extra if subject not in (info.config.subjects or [])]
        if missing:
            raise Refused(f"workflow {workflow.id} declares trigger subjects ({', '.join(missing)}) that stream "
                          f"{s.TRIGGERS_STREAM} does not capture yet; adding them changes the stream, which takes "
                          f"an admin credential: apply it once with `interlock workflow apply` as admin")

    async def workflows(self) -> list[tuple[str, str]]:
        """Every registered (workflow id, version)."""
        return await self._registry.list()

    async def workflow(self, workflow_id: str, version: str | None = None) -> Workflow:
        """A registered workflow (its latest version unless ``version``)."""
        try:
            return await self._registry.get(workflow_id, version)
        except WorkflowNotFound as e:
            raise NotFound(str(e)) from None
        except InvalidKeyError:  # a version no registry key can hold was never registered
            raise NotFound(f"workflow {workflow_id} has no version {version!r}") from None

    # -- runs --------------------------------------------------------------------------------
    async def start_run(self, workflow_id: str, input: Any = None, *, key: str | None = None,
                        version: str | None = None, requested_by: str = "", rerun_of: str | None = None,
                        reuse: dict[str, Any] | None = None, check: bool = True, patience: float = 30.0,
                        priority: int | None = None) -> str:
        """Publish a trigger and return the run id. The same ``key`` never starts two runs (the id
        is derived from tenant, workflow and key). ``check``: first make sure the workflow exists;
        ``patience``: how long to keep publishing through a failover; ``priority``: 1 (lowest) to 5
        (highest), default the workflow's (else 3): a saturated topic hands out higher ones first."""
        paths: frozenset[str] = frozenset()
        if check:
            paths = (await self.workflow(workflow_id, version)).sensitive_paths("input")
        key = key or uuid.uuid4().hex
        run_id = str(run_id_for(self.tenant, workflow_id, key))
        # sensitive values leave this process sealed: the trigger stream never holds them in clear
        input = self._seal_input(run_id, input, paths)
        trigger = Trigger(workflow_id=workflow_id, workflow_version=version, input=input, idempotency_key=key,
                          tenant=self.tenant, requested_by=requested_by, rerun_of=rerun_of, reuse_outputs=reuse or {},
                          priority=_priority(priority))
        await publish(self.js, s.trigger(self.tenant, workflow_id), trigger.model_dump_json().encode(),
                      headers={h.MSG_ID: f"trigger:{self.tenant}:{workflow_id}:{key}"}, patience=patience)
        return run_id

    def _payload_sealer(self) -> PayloadSealer:
        if self._sealer is None:
            self._sealer = PayloadSealer.from_settings(ClientSettings.load())
        return self._sealer

    def _seal_input(self, run_id: str, value: Any, paths: frozenset[str]) -> Any:
        sealer = self._payload_sealer()
        if not sealer.rules.with_paths(paths).needs_sealing(value, "input"):
            return value
        try:
            return sealer.seal_tree(self.tenant, run_id, value, "input", paths)
        except (DataKeyError, SealedError) as e:
            raise ClientError(f"cannot seal the sensitive values of the run's input: {e}") from None

    def unseal(self, value: Any) -> Any:
        """``value`` (an input or output read from a run's log) with its sealed values opened with this
        tenant's data keys (``INTERLOCK_DATA_KEYS_FILE``). Raises :class:`ClientError` ("data key
        destroyed: …") for a value of a forgotten tenant."""
        try:
            return self._payload_sealer().open_tree(self.tenant, value)
        except (DataKeyError, SealedError) as e:
            raise ClientError(str(e)) from None

    async def submit_run(self, workflow_id: str, input: Any = None, *, key: str, version: str | None = None,
                         requested_by: str = "", wait_started: float = 0.0, priority: int | None = None
                         ) -> tuple[str, bool]:
        """Start a run unless trigger ``key`` already started one: (run id, True if this call
        started it). Raises :class:`NotFound` for an unknown workflow (or version). ``priority``:
        as for :meth:`start_run`.

        ``wait_started``: wait up to this many seconds for the run's first commit, so that a read
        right after (an HTTP client following the Location) finds it; on timeout it returns anyway
        (the trigger is durable: the planner starts the run when it gets to it)."""
        known = self._known_workflows.get((workflow_id, version))
        if known is None or time.monotonic() - known > WORKFLOW_CHECK_S:
            await self.workflow(workflow_id, version)
            self._known_workflows[(workflow_id, version)] = time.monotonic()
        run_id = str(run_id_for(self.tenant, workflow_id, key))
        trigger = Trigger(workflow_id=workflow_id, workflow_version=version, input=input, idempotency_key=key,
                          tenant=self.tenant, requested_by=requested_by, priority=_priority(priority))
        with self._slots_busy():
            # both at once (one round trip): a trigger for a run that exists changes nothing (the
            # planner starts a run id once), so publishing it whatever the log holds is safe; the
            # log read goes out first on this connection, before the trigger the run could come from
            existed, ack = await asyncio.gather(
                self._store.exists(self.tenant, run_id),
                publish(self.js, s.trigger(self.tenant, workflow_id), trigger.model_dump_json().encode(),
                        headers={h.MSG_ID: f"trigger:{self.tenant}:{workflow_id}:{key}"}))
        # a duplicate: the same key was triggered moments ago (inside the stream's duplicate window)
        created = not (existed or ack.duplicate)
        if wait_started > 0 and not existed:
            await self._until_started(run_id, wait_started)
        return run_id, created

    async def _until_started(self, run_id: str, patience: float) -> bool:
        deadline = time.monotonic() + patience
        delay = 0.002
        while True:
            with self._slots_busy():
                if await self._store.exists(self.tenant, run_id):
                    return True
            if time.monotonic() + delay > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def watch(self, run_id: str, *, timeout: float | None = None,
                    heartbeats: bool = False, after_seq: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Every event envelope of the run, from its first, as it is appended, until (and with)
        the terminal one. Raises :class:`ClientError` if the run has not ended by ``timeout``.
        ``after_seq``: a terminal event up to that seq does not end the watch (a run resumed
        after it failed: wait for its next end)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        heartbeat = ev.StepHeartbeat.type_name
        async with contextlib.aclosing(self._follow(run_id)) as commits:
            async for commit in commits:
                if deadline is not None and time.monotonic() >= deadline:
                    raise ClientError(f"run {run_id} did not finish within {timeout:g}s")
                for envelope in commit.envelopes if commit is not None else ():
                    if envelope["type"] == heartbeat and not heartbeats:
                        continue
                    yield envelope
                    if envelope["type"] in TERMINAL_EVENTS and envelope["seq"] > after_seq:
                        return

    async def _follow(self, run_id: str) -> AsyncGenerator[StoredCommit | None, None]:
        """The run's commits as they are appended; None after each idle second. An ordered
        consumer, or (a credential that may not direct-get) one of its own slot consumers."""
        subject = s.run_log(self.tenant, run_id)
        if self._store.recorder.slots:
            with self._slots_busy():
                async with contextlib.aclosing(self._store.recorder.follow(subject)) as commits:
                    async for commit in commits:
                        yield commit
            return
        sub = await self.js.subscribe(subject, ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    yield None
                    continue
                # bytes that are not a commit come as a flagged entry with no events, never an error
                yield stored_commit(msg.metadata.sequence.stream, msg.data, dict(msg.headers or {}),
                                    msg.metadata.timestamp.timestamp())
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    @contextlib.contextmanager
    def _slots_busy(self) -> Iterator[None]:
        try:
            yield
        except SlotsBusy as e:
            raise ClientError(f"{self.principal} ({self.creds}) cannot read a run's log now: {e}") from None

    async def wait(self, run_id: str, *, timeout: float | None = None, on_event: OnEvent | None = None,
                   after_seq: int = 0) -> str:
        """Wait for the run to end; return its final event type (e.g. ``RunSucceeded``).
        ``on_event`` (sync or async) sees every envelope first; ``after_seq`` as for :meth:`watch`."""
        async for envelope in self.watch(run_id, timeout=timeout, after_seq=after_seq):
            if on_event is not None:
                result = on_event(envelope)
                if inspect.isawaitable(result):
                    await result
            if envelope["type"] in TERMINAL_EVENTS and envelope["seq"] > after_seq:
                return str(envelope["type"])
        raise ClientError(f"run {run_id}: the event stream ended before the run did")

    async def load_run(self, run_id: str) -> Run:
        """The run as replaying its log gives it."""
        try:
            with self._slots_busy():
                return (await self._store.load(self.tenant, run_id, fresh=True)).run
        except RunNotFound as e:
            raise NotFound(str(e)) from None
        except (TimeoutError, EventStoreError) as e:  # no answer: a leader election, a restarting server
            raise Unavailable(f"run {run_id}'s log could not be read: {e or type(e).__name__} (try again)") from None

    async def read_commits(self, run_id: str, after_seq: int = 0) -> list[StoredCommit]:
        """The run's commits after stream sequence ``after_seq``, in order, as stored."""
        with self._slots_busy():
            return await self._store.read_commits(self.tenant, run_id, after_seq)

    async def events(self, run_id: str) -> list[dict[str, Any]]:
        """Every event envelope of the run, in order (empty if it has none)."""
        return [e for c in await self.read_commits(run_id) for e in c.envelopes]

    async def rerun_plan(self, run_id: str, from_step: str) -> RerunPlan:
        """What re-running ``run_id`` from ``from_step`` would do: that step and everything
        downstream run again; the outputs of the other succeeded steps are reused."""
        old = await self.load_run(run_id)
        wf = await self.workflow(old.workflow_id, old.workflow_version)
        if from_step not in wf.steps:
            raise NotFound(f"workflow {wf.id} has no step {from_step!r}; steps: {', '.join(wf.steps)}")
        rerun = frozenset({from_step, *wf.downstream(from_step)})
        # outputs kept in the payload store are not copied: those steps run again
        reuse = {sid: st.output for sid, st in old.steps.items()
                 if sid in wf.steps and sid not in rerun and st.status == "succeeded" and st.output_ref is None}
        return RerunPlan(source=old, workflow=wf, from_step=from_step, rerun=rerun, reuse=reuse)

    async def rerun(self, plan: RerunPlan, *, requested_by: str = "") -> str:
        """Start the run a :meth:`rerun_plan` describes; return its id."""
        key = f"rerun:{plan.source.run_id}:{plan.from_step}:{time.time_ns()}"
        return await self.start_run(plan.workflow.id, plan.source.input, key=key, version=plan.workflow.version,
                                    requested_by=requested_by, rerun_of=str(plan.source.run_id), reuse=plan.reuse,
                                    check=False)

    # -- approvals and commands --------------------------------------------------------------
    async def pending_approval(self, run_id: str, step_id: str) -> PendingApproval:
        """The approval ``step_id`` of the run waits for (from the run's log)."""
        run = await self.load_run(run_id)
        step = run.steps.get(step_id)
        if step is None or step.approval is None or step.approval.status != "requested":
            pending = [sid for sid, st in run.steps.items() if st.approval and st.approval.status == "requested"]
            raise NotFound(f"step {step_id!r} of run {run_id} has no pending approval"
                           + (f"; pending: {', '.join(pending)}" if pending else ""))
        request = step.approval
        return PendingApproval(run_id=run_id, step_id=step_id, job_hash=request.job_hash,
                               snapshot_id=request.snapshot_id, approver_role=request.approver_role,
                               input=step.input)

    def _command_subject(self, name: str) -> str:
        """The subject of command ``name`` from this client (its tenant, its principal)."""
        return s.command(self.tenant, name, self.principal)

    def _query_subject(self, name: str) -> str:
        """The subject of query ``name`` for this client's tenant."""
        return s.query(self.tenant, name)

    async def _decide(self, grant: bool, run_id: str, step_id: str, role: str | None,
                      job_hash: str | None, reason: str, signer: Signer | None, via: str) -> CommandReply:
        subject = self._command_subject("approve" if grant else "reject")
        self._may_publish(subject, f"{'approve' if grant else 'reject'} in tenant {self.tenant}")
        snapshot_id = ""
        try:
            pending = await self.pending_approval(run_id, step_id)
        except NotFound:
            if role is None or job_hash is None:
                raise
            # the service answers for a run or request it cannot find, naming it
        else:
            role = role if role is not None else pending.approver_role
            job_hash = job_hash or pending.job_hash
            snapshot_id = pending.snapshot_id
        if signer is None and self.creds is not None:
            signer = Signer.from_creds(self.creds)  # the approver's own key: nobody else can sign for them
        signed = None
        if signer is not None:
            statement = ApprovalStatement(
                tenant=self.tenant, run_id=run_id, step_id=step_id, job_hash=job_hash,
                snapshot_id=snapshot_id, decision="approve" if grant else "reject",
                principal=self.principal, role=role, reason=reason,
                at=datetime.now(UTC).isoformat().replace("+00:00", "Z"), via=via)
            signed = SignedApproval(statement=statement, key_id=signer.key_id,
                                    signature=signer.sign_b64(approval_bytes(statement)))
        decision = ApprovalDecision(run_id=run_id, step_id=step_id, job_hash=job_hash, role=role, reason=reason,
                                    signed=signed, via=via)
        return await self._command(subject, decision, "approval")

    async def approve(self, run_id: str, step_id: str, *, role: str | None = None,
                      job_hash: str | None = None, reason: str = "", signer: Signer | None = None,
                      via: str = "cli") -> CommandReply:
        """Grant a pending approval as :attr:`principal` (bound to ``job_hash``; by default the one
        asked for). The decision is signed with ``signer`` (default: the key of the credential
        this client connected with); ``via`` says how it was given (the HTTP API: ``api:<key id>``)."""
        return await self._decide(True, run_id, step_id, role, job_hash, reason, signer, via)

    async def reject(self, run_id: str, step_id: str, *, reason: str, role: str | None = None,
                     job_hash: str | None = None, signer: Signer | None = None, via: str = "cli") -> CommandReply:
        """Reject a pending approval as :attr:`principal`; the run fails with ``reason`` (signed as
        :meth:`approve` is)."""
        return await self._decide(False, run_id, step_id, role, job_hash, reason, signer, via)

    async def cancel(self, run_id: str, *, reason: str = "") -> CommandReply:
        """Cancel a run as :attr:`principal` (the planner refuses one that has ended)."""
        return await self._command(self._command_subject("cancel"), CancelRequest(run_id=run_id, reason=reason),
                                   "planner")

    # -- intervening in a run, and feedback (issue 17) -----------------------------------------
    async def retry_step(self, run_id: str, step_id: str, *, reason: str, input: Any = KEEP_INPUT,
                         via: str = "cli") -> CommandReply:
        """Retry a failed, timed-out or waiting step now, as :attr:`principal` (a failed run resumes).
        ``input``: run the retry with this input instead (the step's job hash is recomputed, so
        policy and approvals decide again for it); by default the step's input is kept."""
        patched = input is not KEEP_INPUT
        request = RetryStepRequest(run_id=run_id, step_id=step_id, reason=reason, via=via, patched=patched,
                                   input=input if patched else None)
        return await self._command(self._command_subject("retry"), request, "planner")

    async def skip_step(self, run_id: str, step_id: str, *, output: Any, reason: str, via: str = "cli"
                        ) -> CommandReply:
        """Complete a step with ``output`` as :attr:`principal`, so its dependants proceed."""
        request = SkipStepRequest(run_id=run_id, step_id=step_id, output=output, reason=reason, via=via)
        return await self._command(self._command_subject("skip"), request, "planner")

    async def resume_run(self, run_id: str, *, reason: str, via: str = "cli") -> CommandReply:
        """Resume a failed run from its failed steps (the same run id goes on)."""
        return await self._command(self._command_subject("resume"),
                                   RunControlRequest(run_id=run_id, reason=reason, via=via), "planner")

    async def pause_run(self, run_id: str, *, reason: str, via: str = "cli") -> CommandReply:
        """Stop dispatching a running run's jobs (those already out finish) until :meth:`unpause_run`."""
        return await self._command(self._command_subject("pause"),
                                   RunControlRequest(run_id=run_id, reason=reason, via=via), "planner")

    async def unpause_run(self, run_id: str, *, reason: str, via: str = "cli") -> CommandReply:
        """Dispatch a paused run's jobs again."""
        return await self._command(self._command_subject("unpause"),
                                   RunControlRequest(run_id=run_id, reason=reason, via=via), "planner")

    async def give_feedback(self, run_id: str, step_id: str, *, score: float | None = None,
                            correction: Any = KEEP_INPUT, note: str = "", output_hash: str | None = None,
                            via: str = "cli") -> CommandReply:
        """Rate (``score``) or correct (``correction``, any JSON) a step's output, with a ``note``, as
        :attr:`principal`: recorded in the run's log bound to the output's hash (``output_hash``:
        refused if the step's output is not that one)."""
        given = correction is not KEEP_INPUT
        request = FeedbackRequest(run_id=run_id, step_id=step_id, score=score, has_correction=given,
                                  correction=correction if given else None, note=note, output_hash=output_hash,
                                  via=via)
        return await self._command(self._command_subject("feedback"), request, "planner")

    async def feedback(self, *, run_id: str | None = None, workflow_id: str | None = None,
                       limit: int = 1000) -> list[dict[str, Any]]:
        """Feedback on step outputs of a run, or of a workflow's runs, oldest first (the auditor's
        projection: each row has the output it is about, ``[sensitive]`` where sealed)."""
        if run_id is None and workflow_id is None:
            raise ValueError("name a run or a workflow")
        query = FeedbackQuery(run_id=run_id, workflow_id=workflow_id, limit=limit)
        return list(await self._query(self._query_subject("feedback"), query))

    # -- queries (the auditor's projection) --------------------------------------------------
    async def runs(self, *, status: str | None = None, workflow_id: str | None = None,
                   limit: int = 50) -> list[dict[str, Any]]:
        """Runs, newest first, optionally of one status or workflow."""
        return list(await self._query(self._query_subject("runs"),
                                      RunsQuery(status=status, workflow_id=workflow_id, limit=limit)))

    async def runs_page(self, *, status: str | None = None, workflow_id: str | None = None,
                        idempotency_key: str | None = None, started_after: str | None = None,
                        started_before: str | None = None, cursor: str | None = None,
                        limit: int = 50) -> tuple[list[dict[str, Any]], str | None]:
        """One page of runs, newest first, and the cursor of the next page (None: this is the last).
        ``started_*``: ISO 8601 times; ``cursor``: a previous page's (opaque). Raises ValueError
        for a cursor this client did not make."""
        before = _runs_cursor.decode(cursor) if cursor else (None, None)
        query = RunsQuery(status=status, workflow_id=workflow_id, idempotency_key=idempotency_key,
                          started_after=started_after, started_before=started_before, before_started_at=before[0],
                          before_run_id=before[1], limit=limit)
        rows = list(await self._query(self._query_subject("runs"), query))
        last = rows[-1] if len(rows) >= limit > 0 else None
        return rows, (_runs_cursor.encode(str(last.get("started_at") or ""), str(last["run_id"])) if last else None)

    async def status(self, run_id: str) -> dict[str, Any]:
        """The run's row (``status``, ``workflow_id``, …) and the state of each step (``steps``)."""
        return dict(await self._query(self._query_subject("status"), RunQuery(run_id=run_id)))

    async def timeline(self, run_id: str, *, after_seq: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """The run's events in order, each with its one-line ``summary``: those after run seq
        ``after_seq``, at most ``limit`` (a page: the next starts after the last row's ``seq``)."""
        return list(await self._query(self._query_subject("timeline"),
                                      RunQuery(run_id=run_id, after_seq=after_seq, limit=limit)))

    async def usage(self, *, group_by: Literal["run", "workflow", "tenant"] = "workflow", run_id: str | None = None,
                    workflow_id: str | None = None, since: datetime | None = None, limit: int = 100
                    ) -> list[dict[str, Any]]:
        """Model calls, tokens and cost of this tenant's runs, summed per ``group_by``, most expensive first."""
        query = UsageQuery(group_by=group_by, run_id=run_id, workflow_id=workflow_id, since=since, limit=limit)
        return list(await self._query(self._query_subject("usage"), query))

    # -- compare runs (issue 17) ----------------------------------------------------------------
    async def run_diff(self, run_a: str, run_b: str) -> RunDiff:
        """Runs ``run_a`` and ``run_b`` aligned step by step, from their logs (sensitive values
        redacted), with the first divergence marked."""
        logs = []
        for run_id in (run_a, run_b):
            envelopes = await self.events(run_id)
            if not envelopes:
                raise NotFound(f"run {run_id} not found in tenant {self.tenant}")
            logs.append(envelopes)
        return diff_runs(logs[0], logs[1])

    async def failures(self, workflow_id: str, *, since: datetime | None = None,
                       limit: int = 1000) -> list[FailureGroup]:
        """This tenant's failed runs of ``workflow_id`` (started at or after ``since``; at most
        ``limit``, newest first) grouped by the step and error where they broke, most frequent first."""
        rows = await self._query(self._query_subject("failures"),
                                 FailuresQuery(workflow_id=workflow_id, since=since, limit=limit))
        return group_failures(rows or [])

    async def schedules(self, *, workflow_id: str | None = None) -> list[ScheduleRow]:
        """This tenant's workflow schedules (``schedule:`` in a workflow's latest version), by workflow id:
        cron or every, time zone, missed-tick policy, next tick and the run of the latest tick. The
        planner answers (it keeps the schedules)."""
        rows = await self._query(self._query_subject("schedules"), SchedulesQuery(workflow_id=workflow_id), "planner")
        return [ScheduleRow.model_validate(row) for row in rows or []]

    async def alerts(self, *, include_resolved: bool = False) -> list[Alert]:
        """This tenant's alerts, newest change first: each alert's latest state (firing ones only,
        unless ``include_resolved``). Read from the notify stream, where the auditor publishes them."""
        recorder = JetStreamRecorder(self.nc, self.js, stream=s.NOTIFY_STREAM, slots=self._store.recorder.slots,
                                     decode=_alert_message)
        latest: dict[str, Alert] = {}
        for stored in await recorder.read_commits(s.alerts(self.tenant)):
            for raw in stored.envelopes:
                try:
                    alert = Alert.model_validate(raw)
                except ValidationError:
                    continue  # not an alert (a foreign message): skipped, never a crash
                latest[alert.alert_id] = alert
        shown = [a for a in latest.values() if include_resolved or a.state == "firing"]
        return sorted(shown, key=lambda a: a.at, reverse=True)

    async def approvals(self) -> list[dict[str, Any]]:
        """Pending approvals, oldest first."""
        return list(await self._query(self._query_subject("approvals"), RunsQuery()))

    async def wait_projected(self, run_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """:meth:`status` once the auditor (which projects asynchronously) has the run's final state."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(NotFound):  # the auditor may not have the run's first event yet
                result = await self.status(run_id)
                if result.get("status") not in (None, "running", "compensating"):
                    return result
            if time.monotonic() > deadline:
                raise ClientError(f"the auditor did not project the end of run {run_id} within {timeout:g}s")
            await asyncio.sleep(0.1)

    # -- workload control (issue 16) ---------------------------------------------------------
    async def breakers(self, topic: str | None = None) -> list[BreakerState]:
        """This tenant's circuit breakers (of one ``topic``), by topic: state, counts, last change."""
        await self._provision()
        return await _workload.breakers(self.js, self.tenant, s.topic_tokens(topic) if topic else None)

    async def breaker_log(self, topic: str) -> list[BreakerChange]:
        """The state changes of one topic's breaker, oldest first."""
        await self._provision()
        return await _workload.breaker_log(self.js, self.tenant, s.topic_tokens(topic))

    async def rollouts(self, topic: str | None = None) -> list[Rollout]:
        """This tenant's canary rollouts (of one ``topic``), active and finished."""
        await self._provision()
        return await _workload.rollouts(self.js, self.tenant, s.topic_tokens(topic) if topic else None)

    async def rollout_start(self, topic: str, to: str, share: float, *, stable: str | None = None,
                            window_s: float = 300.0, min_jobs: int = 20, max_failure_delta: float = 0.05,
                            max_latency_ratio: float = 1.5) -> Rollout:
        """Send ``share`` (0 to 1) of ``topic``'s jobs to agent version ``to`` and the rest to the stable
        version (``stable``, default the one other live version); the dispatchers compare the two
        and promote ``to`` or roll it back."""
        topic = s.topic_tokens(topic)
        self._may_publish(p.kv_key(s.ROLLOUTS_BUCKET, s.rollout_key(self.tenant, topic)), "start a rollout")
        await self._provision()
        now = datetime.now(UTC)
        live = _workload.live_versions(await self.agents(), topic, now)
        rollout = _workload.new_rollout(self.tenant, topic, to, share, live, stable=stable, now=now, by=self.principal,
                                        window_s=window_s, min_jobs=min_jobs, max_failure_delta=max_failure_delta,
                                        max_latency_ratio=max_latency_ratio)
        return await _workload.start(self.js, rollout)

    async def rollout_abort(self, topic: str, *, reason: str = "") -> Rollout:
        """Stop an active rollout: every job of the topic goes to the stable version."""
        topic = s.topic_tokens(topic)
        self._may_publish(p.kv_key(s.ROLLOUTS_BUCKET, s.rollout_key(self.tenant, topic)), "abort a rollout")
        return await _workload.abort(self.js, self.tenant, topic, by=self.principal, reason=reason)

    async def rollout_clear(self, topic: str) -> Rollout:
        """Remove a finished rollout (the topic's jobs go to any worker again); returns it."""
        topic = s.topic_tokens(topic)
        self._may_publish(p.kv_key(s.ROLLOUTS_BUCKET, s.rollout_key(self.tenant, topic)), "clear a rollout")
        return await _workload.clear(self.js, self.tenant, topic)

    # -- operations --------------------------------------------------------------------------
    async def agents(self) -> list[AgentRegistration]:
        """This tenant's registered agent workers, by topic and worker id."""
        try:
            kv = await self.js.key_value(s.AGENTS_BUCKET)
        except nats.js.errors.BucketNotFoundError:  # nothing provisioned yet: nobody registered
            return []
        regs = []
        for key in await matching_keys(kv, f"{s.token(self.tenant, 'tenant')}.{p.REST}"):  # agent_key: tenant first
            with contextlib.suppress(Exception):  # deleted between the listing and get()
                entry = await kv.get(key)
                regs.append(AgentRegistration.model_validate_json(entry.value or b"{}"))
        return sorted(regs, key=lambda r: (r.topic, r.worker_id))

    async def queue_depth(self) -> dict[str, int]:
        """Jobs queued per topic of this tenant: published by the dispatcher and not yet finished by a
        worker (the jobs stream is a work queue). Jobs a workload limit holds back are not queued yet:
        they wait in the dispatcher's gate (StepThrottled in their runs' logs)."""
        try:
            info = await self.js.stream_info(s.JOBS_STREAM, subjects_filter=s.tenant_jobs(self.tenant))
        except Exception as e:
            raise Unavailable(f"cannot read the jobs stream: {e!r}") from None
        depth = {}
        for subject, count in (info.state.subjects or {}).items():
            with contextlib.suppress(ValueError):
                depth[s.parse_job(subject)[1]] = int(count)
        return dict(sorted(depth.items()))

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters: messages a service could not process. Anything else
        on a dead-letter subject is listed as an unreadable entry (its reason names its stream
        sequence and size) rather than failing the read."""
        return [entry.letter for entry in await self._scan_dead_letters(s.DLQ_ALL, limit, None, None)]

    async def dead_letter_entries(self, limit: int = 100, *, status: str | None = None,
                                  service: str | None = None) -> list[DeadLetterEntry]:
        """Dead letters, oldest first, each with its id (its IL_DLQ stream sequence) and what was
        done about it; ``status`` (open, resolved, replayed) and ``service`` filter, ``limit`` caps
        what is returned. A foreign message is an unreadable entry, never an error."""
        subject = s.dead_letter(service) if service else s.DLQ_ALL
        return await self._scan_dead_letters(subject, limit, await self._dead_letter_records(), status)

    async def _scan_dead_letters(self, subject: str, limit: int, records: dict[int, DeadLetterStatus] | None,
                                 status: str | None) -> list[DeadLetterEntry]:
        sub = await self.js.subscribe(subject, ordered_consumer=True)
        entries: list[DeadLetterEntry] = []
        try:
            while len(entries) < limit:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    break
                seq = msg.metadata.sequence.stream
                letter, readable = read_entry(msg.subject, msg.data, seq, msg.metadata.timestamp)
                entry = DeadLetterEntry(seq, letter, readable, (records or {}).get(seq))
                if status is None or entry.status == status:
                    entries.append(entry)
        finally:
            await sub.unsubscribe()
        return entries

    async def _dead_letter_records(self) -> dict[int, DeadLetterStatus]:
        kv = await self._dead_letter_bucket()
        records: dict[int, DeadLetterStatus] = {}
        for key in await matching_keys(kv):
            with contextlib.suppress(Exception):  # a foreign value: the dead letter shows as open
                entry = await kv.get(key)
                record = DeadLetterStatus.model_validate_json(entry.value or b"")
                records[record.seq] = record
        return records

    async def _dead_letter_bucket(self) -> Any:
        try:
            return await self.js.key_value(s.DLQ_STATUS_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            await self._provision()  # a stack provisioned before dead letters had a status
            try:
                return await self.js.key_value(s.DLQ_STATUS_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                raise Unavailable(f"bucket {s.DLQ_STATUS_BUCKET} does not exist: run `interlock provision` "
                                  f"with the admin credential") from None

    async def _dead_letter(self, seq: int) -> DeadLetterEntry:
        key = s.dead_letter_key(seq)
        try:
            msg = await self.js.get_msg(s.DLQ_STREAM, seq)
        except nats.js.errors.NotFoundError:
            raise NotFound(f"dead letter {key} not found (ids are the numbers `interlock dlq` lists)") from None
        if msg.subject is None or not msg.subject.startswith(s.DLQ_ALL.removesuffix(">")):
            raise NotFound(f"dead letter {key} not found (stream {s.DLQ_STREAM} seq {key} is {msg.subject})")
        letter, readable = read_entry(msg.subject, msg.data or b"", seq, msg.time)
        return DeadLetterEntry(seq, letter, readable)

    async def _record_dead_letter_action(self, seq: int, action: DeadLetterAction) -> DeadLetterStatus:
        """Append ``action`` to the dead letter's record (compare-and-set: a concurrent action is
        kept, and this one is appended after it)."""
        kv = await self._dead_letter_bucket()
        key = s.dead_letter_key(seq)
        self._may_publish(p.kv_key(s.DLQ_STATUS_BUCKET, key), f"record what was done about dead letter {key}")
        for _ in range(10):
            try:
                entry = await kv.get(key)
                current, revision = DeadLetterStatus.model_validate_json(entry.value or b""), entry.revision
            except nats.js.errors.KeyNotFoundError:
                current, revision = None, None
            record = with_action(current, seq, action)
            try:
                if revision is None:
                    await kv.create(key, record.model_dump_json().encode())
                else:
                    await kv.update(key, record.model_dump_json().encode(), last=revision)
                return record
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
                continue  # someone else acted on it meanwhile: read again, append after theirs
        raise ClientError(f"dead letter {key}: could not record the {action.action} (kept changing); try again")

    async def resolve_dead_letter(self, seq: int, *, note: str) -> DeadLetterStatus:
        """Mark dead letter ``seq`` resolved, with a note saying how; recorded as by this client's
        principal, now. The dead letter stays in IL_DLQ; its record keeps every action."""
        await self._dead_letter(seq)  # it exists
        action = DeadLetterAction(action="resolved", by=self.principal, at=datetime.now(UTC), note=note)
        return await self._record_dead_letter_action(seq, action)

    async def replay_dead_letter(self, seq: int, *, note: str = "") -> DeadLetterStatus:
        """Publish dead letter ``seq``'s original again to its subject, with a new message id (and
        header Interlock-Replay-Of: seq), and record who replayed it, when, and where it was stored.
        Refused (:class:`Refused`) for a foreign message, a truncated original or a subject that is
        not a queue (run events, requests)."""
        entry = await self._dead_letter(seq)
        try:
            subject, data, headers = replay_of(entry.letter, entry.readable, seq)
        except CannotReplay as e:
            raise Refused(str(e)) from None
        self._may_publish(subject, f"replay dead letter {seq} to {subject}")
        kv = await self._dead_letter_bucket()
        current: DeadLetterStatus | None = None
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            current = DeadLetterStatus.model_validate_json((await kv.get(s.dead_letter_key(seq))).value or b"")
        msg_id = replay_msg_id(seq, current)
        ack = await publish(self.js, subject, data, headers={**headers, h.MSG_ID: msg_id})
        action = DeadLetterAction(action="replayed", by=self.principal, at=datetime.now(UTC), note=note,
                                  msg_id=msg_id, subject=subject, stream_seq=ack.seq)
        return await self._record_dead_letter_action(seq, action)

    async def verify(self, run_id: str, *, keyring: Keyring | None = None) -> VerifyReport:
        """Check the run's hash chain and sequence, every commit's signature and entitlement and
        every approver's signature against ``keyring`` (default: the keyring bucket's); render
        with ``core.verify.render_report``. With ``INTERLOCK_SIGNING=off`` unsigned commits pass."""
        trust = keyring if keyring is not None else await self.keyring()
        return await verify_run(self._store, self.tenant, run_id, trust, require_signatures=signing_enabled())

    async def keyring(self) -> Keyring:
        """The trusted keys, as the keyring bucket holds them (``interlock audit keyring``)."""
        try:
            return await read_keyring(self.js)
        except Exception as e:
            raise Unavailable(f"cannot read the keyring ({s.KEYRING_BUCKET}): {e or type(e).__name__}") from None

    async def export_run(self, run_id: str) -> list[str]:
        """The run's stored messages as export lines (``interlock audit export``)."""
        commits = await self.read_commits(run_id)
        if not commits:
            raise NotFound(f"run {run_id} has no events in tenant {self.tenant!r}")
        return list(export_lines(run_id, self.tenant, commits))

    # -- seals -------------------------------------------------------------------------------
    def _may_read(self, stream: str, what: str) -> None:
        self._may_publish(s.js_direct_get(stream), f"{what} (reading {stream}; the admin credential may)")

    async def seals(self) -> list[Seal]:
        """The auditor's seals of the event stream, oldest first (an unreadable one: ClientError)."""
        self._may_read(s.SEALS_STREAM, "list the seals")
        stored = await _seals.read_seals(self.nc)
        bad = [(n, x) for n, x in enumerate(stored.seals, start=1) if isinstance(x, ValueError)]
        if bad:
            raise ClientError(f"seal {bad[0][0]} in {s.SEALS_STREAM} is not a seal: {bad[0][1]}")
        return [x for x in stored.seals if not isinstance(x, ValueError)]

    async def verify_seals(self, run_id: str | None = None, *, seals_file: str | Path | None = None,
                           keyring: Keyring | None = None) -> SealReport:
        """The event stream (or one run's log) against the latest seal: truncation, purges, deleted
        messages, a re-created stream, a run rolled back or rewritten (render with
        ``runtime.seals.render_seal_report``). ``seals_file``: an export to check against instead
        of IL_SEALS (catches a re-created stream whose seals were wiped too). Seals must be signed
        by an auditor key of ``keyring`` (None: the keyring bucket's)."""
        seals = _seals.load_seal_file(Path(seals_file)) if seals_file is not None else None
        source = str(seals_file) if seals_file is not None else s.SEALS_STREAM
        if seals is None:
            try:
                self._may_read(s.SEALS_STREAM, "check against the seals")
            except Refused as e:
                if run_id is None:
                    raise
                # a person may verify a run's chain without seeing the seals (they name every tenant's runs)
                return SealReport(None, note=f"not checked against a seal: {e}; check against an export an "
                                             "admin made (`interlock audit seal export`) with --seals FILE")
        verify = _seals.seal_verifier(keyring if keyring is not None else await read_keyring(self.js))
        try:
            if run_id is None:
                self._may_read(s.EVENTS_STREAM, "check the whole event stream")
                return await _seals.verify_stream(self.nc, verify, seals=seals, source=source)
            commits = [(c.stream_seq, c.envelopes) for c in await self.read_commits(run_id)]
            return await _seals.verify_run_heads(self.nc, verify, s.run_events(self.tenant, run_id), commits,
                                                 seals=seals, source=source)
        except _seals.SealError as e:
            raise ClientError(str(e)) from None

    # -- HTTP API keys -----------------------------------------------------------------------
    def _api_keys(self) -> ApiKeyStore:
        return self._keys

    async def create_api_key(self, role: str, *, principal: str | None = None, by: str = "") -> tuple[
            ApiKeyRecord, str]:
        """A new HTTP API key of ``role`` for this client's tenant: (its record, the key). The key
        is not stored anywhere (only its SHA-256): show it once."""
        self._may_publish(p.kv_key(s.APIKEYS_BUCKET, "new"), "create API keys")
        await self._provision()
        try:
            return await self._api_keys().create(self.tenant, role, principal=principal, by=by or self.principal)
        except ApiKeyError as e:
            raise Refused(str(e)) from None

    async def api_keys(self, *, all_tenants: bool = False) -> list[ApiKeyRecord]:
        """The records of this tenant's API keys (revoked ones too), oldest first."""
        await self._provision()
        return await self._api_keys().list(None if all_tenants else self.tenant)

    async def check_api_key(self, key: str) -> ApiKeyRecord | None:
        """The active record of an API key, None for an unknown, revoked or wrong one (any tenant)."""
        return await self._api_keys().check(key)

    async def api_key(self, key_id: str) -> ApiKeyRecord | None:
        """The active record of key id ``key_id`` (any tenant), None if unknown or revoked."""
        return await self._api_keys().record(key_id)

    async def revoke_api_key(self, key_id: str, *, by: str = "") -> ApiKeyRecord:
        """Revoke one of this tenant's API keys (it stops working within seconds)."""
        self._may_publish(p.kv_key(s.APIKEYS_BUCKET, "new"), "revoke API keys")
        store = self._api_keys()
        record = await store.get(key_id)
        if record is None or record.tenant != self.tenant:
            raise NotFound(f"no API key {key_id!r} in tenant {self.tenant}")
        return await store.revoke(key_id, by=by or self.principal)

    # -- policy ------------------------------------------------------------------------------
    async def policy_publish(self, source: str, *, version: str | None = None, by: str) -> PolicyRevision:
        """Make a Cedar bundle the active policy in every service (no restart)."""
        self._may_publish(p.kv_key(s.POLICIES_BUCKET, POLICY_KEY), "publish a policy bundle")
        await self._provision()
        return await _policy.publish(self.js, source, version=version, by=by)

    async def policy_rollback(self, *, to: str | None = None, by: str) -> PolicyRevision:
        """Make the previous bundle (or version ``to``) active again."""
        self._may_publish(p.kv_key(s.POLICIES_BUCKET, POLICY_KEY), "roll back the policy")
        await self._provision()
        return await _policy.rollback(self.js, to=to, by=by)

    async def policy_active(self) -> PolicyRevision:
        """The active bundle (``builtin``: nothing published, the default applies)."""
        await self._provision()
        return await _policy.active(self.js)

    async def policy_history(self) -> list[PolicyRevision]:
        """Every published bundle, oldest first."""
        await self._provision()
        return await _policy.history(self.js)

    async def policy_decide(self, workflow_id: str, step_id: str, input: Any = None, *, version: str | None = None,
                            explain: bool = False) -> PolicyDecision:
        """What the active policy decides for one job of a registered workflow."""
        await self._provision()
        workflow = await self.workflow(workflow_id, version)
        if step_id not in workflow.steps:
            raise NotFound(f"workflow {workflow.id} has no step {step_id!r}; steps: {', '.join(workflow.steps)}")
        return await _policy.decide(self.js, workflow, step_id, input, tenant=self.tenant, explain=explain)

    async def policy_simulate(self, draft_source: str, *, limit: int = 500) -> PolicySimulation:
        """Re-decide up to ``limit`` recent jobs with a draft bundle: which decisions would change."""
        await self._provision()
        workflows = {(wf_id, v): await self._registry.get(wf_id, v) for wf_id, v in await self._registry.list()}
        return await _policy.simulate_draft(self.nc, draft_source, workflows, limit=limit)

    # -- approver directory ------------------------------------------------------------------
    async def approvers(self) -> dict[str, list[str]]:
        """Registered approvers and their roles (enforced once anyone is registered)."""
        await self._provision()
        return await _policy.approvers(self.js)

    async def grant_approver(self, name: str, roles: list[str]) -> set[str]:
        """Give ``name`` ``roles``; return every role they now hold."""
        await self._provision()
        return await _policy.grant(self.js, name, roles)

    async def revoke_approver(self, name: str, roles: list[str] | None = None) -> set[str]:
        """Take ``roles`` (all of them when None or empty) from ``name``; return what is left."""
        await self._provision()
        return await _policy.revoke(self.js, name, roles)
