"""The auditor service: projects every run event into a query projection and answers queries;
records who changed which stream (the admin audit)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from interlock.auditor import metrics as log_metrics
from interlock.auditor.alerts import AlertEngine, AlertRules
from interlock.auditor.projection import DEFAULT_PATH, Envelopes, ProgressCallback, Projection, RebuildStats
from interlock.contracts import events as ev
from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.contracts.messages import (
    Alert,
    FailuresQuery,
    FeedbackQuery,
    QueryReply,
    RunQuery,
    RunsQuery,
    UsageQuery,
)
from interlock.core import adminaudit, codec
from interlock.core.eventstore import EventStore, EventStoreError
from interlock.core.eventstore.recorder import stored_commit
from interlock.identity import Signer
from interlock.runtime import metrics, tracing
from interlock.runtime.connect import connect
from interlock.runtime.deadletter import dead_letter
from interlock.runtime.publish import publish
from interlock.runtime.seals import DEFAULT_INTERVAL_S, INTERVAL_ENV, Sealer, seal_verifier
from interlock.runtime.service import Poison, Service, ServiceSettings, body_disagrees
from interlock.runtime.settings import SettingsError

log = logging.getLogger(__name__)

DB_ENV = "INTERLOCK_AUDITOR_DB"
INSTANCE_ENV = "INTERLOCK_AUDITOR_INSTANCE"
ALERT_RULES_ENV = "INTERLOCK_ALERT_RULES"  # JSON thresholds (interlock.auditor.alerts.AlertRules)
ALERTS_ENV = "INTERLOCK_AUDITOR_ALERTS"  # "off": this copy evaluates no alerts (run them on one copy)
ALERT_TICK_S = 2.0
DEFAULT_INSTANCE = "auditor"
MAX_QUERY_LIMIT = 10_000
RECORD_PATIENCE_S = 60.0  # how long a change's record is retried (a leader election, a reconnect)
RUN_END_SEAL_DELAY_S = 1.0  # runs ending within a second share one seal (a seal hashes every run head)
RUN_ENDED = frozenset(t.type_name for t in (ev.RunSucceeded, ev.RunFailed, ev.RunDenied, ev.RunCancelled,
                                            ev.RunTimedOut))

_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_\-]+")


def instance_id(name: str) -> str:
    """A durable-consumer-safe id for a copy's stable name (letters, digits, '_' and '-')."""
    cleaned = _NOT_TOKEN.sub("-", name.strip()).strip("-")
    if not cleaned:
        raise ValueError(f"auditor instance name {name!r} has no usable characters")
    return cleaned


def default_db_path(instance: str) -> str:
    """``.interlock/auditor.sqlite3`` for the default copy, ``.interlock/auditor-{instance}.sqlite3`` else."""
    if instance == DEFAULT_INSTANCE:
        return DEFAULT_PATH
    return str(Path(DEFAULT_PATH).with_name(f"auditor-{instance}.sqlite3"))


OnApplied = Callable[[str, str, Envelopes], None]


async def catch_up(projection: Projection, store: EventStore, tenant: str, run_id: str, envelopes: Envelopes,
                   stream_seq: int | None, on_applied: OnApplied | None = None) -> None:
    """Project one delivered commit; if events are missing before it, read them from the log first.

    Commits of one run normally arrive in order, but a redelivered (nak'd) commit can arrive
    after a later one. Instead of recording a false gap, the run's missing commits are read from
    the store (after the last commit already projected) and applied in order. A gap that is
    really in the stored log is then recorded, and flags the run's chain.
    """
    result = await projection.apply_commit(tenant, run_id, envelopes, stream_seq=stream_seq, hold_gaps=True)
    if result.applied:  # a redelivered commit projects nothing and leaves no span
        tracing.acted(tracing.PROJECTED, events=result.applied)
        if on_applied is not None:
            on_applied(tenant, run_id, envelopes[-result.applied:])
    if not result.gap:
        return
    log.info("auditor: run %s: commit at stream seq %s does not follow seq %s, reading the log", run_id, stream_seq,
             result.last_seq)
    subject = s.run_events(tenant, run_id)
    stored = [commit for commit in await store.read_checked(tenant, run_id, result.last_stream_seq)
              if store.authenticity.check(subject, commit, run_id, tenant) is None]
    commits: list[tuple[str, str, Envelopes, int | None]] = [
        (tenant, run_id, commit.envelopes, commit.stream_seq) for commit in stored]
    if stream_seq is None:
        commits.append((tenant, run_id, envelopes, stream_seq))
    elif all(commit.stream_seq != stream_seq for commit in stored):
        # the read came from a replica that is behind the one that delivered: try again later
        # rather than record a gap that is not in the log
        raise EventStoreError(f"run {run_id}: the log read after stream seq {result.last_stream_seq} does not hold "
                              f"the delivered commit at stream seq {stream_seq} yet")
    await projection.apply_commits(commits)
    tracing.acted(tracing.PROJECTED, commits=len(commits))
    if on_applied is not None:
        for _, _, events, _ in commits:
            on_applied(tenant, run_id, events)


Q = TypeVar("Q", RunQuery, RunsQuery, UsageQuery, FailuresQuery, FeedbackQuery)


class AuditorService(Service):
    """Consumes every run commit into a :class:`Projection` and serves the ``il.q.*`` queries.

    **One projection per copy.** The projection answers queries about *every* run, so each copy
    must see every commit. Copies therefore do not share a durable consumer (a shared one would
    split the commits between them, leaving each projection with holes); each copy has its own
    projection file and its own durable consumer ``auditor_{instance}``, where ``instance`` is
    derived from the stable ``instance`` name given to the constructor (else
    ``$INTERLOCK_AUDITOR_INSTANCE``, else ``"auditor"``).
    Give every copy a different, *stable* name (e.g. the pod or host name, not the pid): the
    durable consumer remembers how far that copy's projection got, so a restart continues where
    it stopped instead of replaying the whole stream, and a renamed copy leaves an orphan
    consumer behind. The query subscribers, on the other hand, share the queue group
    ``auditor``: any copy may answer a query (copies may lag each other by a few events).

    The projection file is ``db_path`` if given, else ``$INTERLOCK_AUDITOR_DB``, else
    ``.interlock/auditor.sqlite3`` (``auditor-{instance}.sqlite3`` for other names); ``:memory:``
    keeps it in memory. Because the consumer position and the projection must agree, start-up
    compares them: if the consumer has acknowledged more than the projection holds (a new,
    deleted or restored file; ``:memory:``) the consumer is deleted, so it is created again from
    the start of the stream and the projection is replayed (idempotently) from scratch. A
    projection built from another ``IL_EVENTS`` stream (the server's store was reset) is wiped
    first (see :meth:`Projection.bind_stream`).

    **The admin audit.** Every copy also subscribes to the server's JetStream API audit
    advisories (queue group ``auditor``: one copy gets each) and records those of requests that
    change a stream or the account on ``il.admin.audit`` (see :mod:`interlock.core.adminaudit`),
    with the advisory's sha256 as message id, so a retried or second copy's record is stored once.
    """

    name = "auditor"

    def __init__(self, settings: ServiceSettings | None = None, *, db_path: str | Path | None = None,
                 instance: str | None = None, seal_interval: float | None = None) -> None:
        super().__init__(settings)
        self.seal_interval = float(seal_interval if seal_interval is not None
                                   else os.environ.get(INTERVAL_ENV) or DEFAULT_INTERVAL_S)
        if self.seal_interval <= 0:
            raise ValueError(f"{INTERVAL_ENV} must be a positive number of seconds, not {self.seal_interval:g}")
        self.seal_writer: Sealer | None = None
        self._seal_soon = asyncio.Event()
        self._sealing: asyncio.Task[None] | None = None
        self.instance = instance_id(instance or os.environ.get(INSTANCE_ENV) or DEFAULT_INSTANCE)
        self.db_path = str(db_path or os.environ.get(DB_ENV) or default_db_path(self.instance))
        self.projection = Projection(self.db_path)
        self.log_metrics = log_metrics.LogMetrics()
        self.alerts: AlertEngine | None = None
        if os.environ.get(ALERTS_ENV, "on").lower() != "off":
            try:
                self.alerts = AlertEngine(AlertRules.model_validate_json(os.environ.get(ALERT_RULES_ENV) or "{}"))
            except ValidationError as e:
                raise SettingsError(f"{ALERT_RULES_ENV}: {e}") from None
        self._alert_ticker: asyncio.Task[None] | None = None
        self._recording: set[asyncio.Task[None]] = set()
        self._api_audit: Subscription | None = None

    # -- consumers -------------------------------------------------------------------------
    def durable(self, suffix: str = "") -> str:
        """This copy's own durable names: ``auditor_{instance}`` (plus a suffix other than "events")."""
        base = f"{self.name}_{self.instance}"
        return base if suffix in ("", "events") else f"{base}_{suffix}"

    async def setup(self) -> None:
        await self.projection.open()
        await self.projection.bind_stream(self.js)
        await self._align_consumer()
        # core NATS, not a consumer: the advisories are not stored (see interlock.contracts.catalog)
        self._api_audit = await self.nc.subscribe(s.JS_API_AUDIT, queue=self.name, cb=self.on_api_audit)
        if self.alerts is not None:
            self._alert_ticker = asyncio.create_task(self._tick_alerts(), name="auditor-alerts")
        self._start_sealing()

    # -- seals -------------------------------------------------------------------------------
    def _start_sealing(self) -> None:
        if self.settings.creds is None:
            log.warning("auditor %s: no credential, so no key to sign seals with: not sealing", self.instance)
            return
        signer = Signer.from_creds(self.settings.creds)
        self.seal_writer = Sealer(self.nc, signer, seal_verifier(self.keyring.keyring, also=signer.key_id))
        self._sealing = asyncio.create_task(self._seal_loop(), name=f"auditor-{self.instance}-seals")

    async def _seal_loop(self) -> None:
        """Seal every ``seal_interval`` seconds, and soon after a run ends."""
        assert self.seal_writer is not None
        reason = "start"
        while True:
            try:
                await self.seal_writer.seal(reason)
            except Exception as e:  # a conflict with another copy, an election: the next round retries
                log.warning("auditor %s: sealing failed (next try in %gs): %s", self.instance, self.seal_interval, e)
            self._seal_soon.clear()
            try:
                await asyncio.wait_for(self._seal_soon.wait(), timeout=self.seal_interval)
                await asyncio.sleep(RUN_END_SEAL_DELAY_S)
                reason = "run_ended"
            except TimeoutError:
                reason = "interval"

    async def teardown(self) -> None:
        if self._sealing is not None:
            self._sealing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sealing
            self._sealing = None
        if self._alert_ticker is not None:
            self._alert_ticker.cancel()
        if self._api_audit is not None:
            await self._api_audit.unsubscribe()
            self._api_audit = None
        if self._recording:
            await asyncio.wait(set(self._recording), timeout=RECORD_PATIENCE_S)
        await self.projection.close()

    # -- admin audit -----------------------------------------------------------------------
    async def on_api_audit(self, msg: Msg) -> None:
        """One API audit advisory: record it when its request changed a stream or the account."""
        try:
            record = adminaudit.record_for(msg.data)
        except ValueError as e:
            await self._record_failed(msg.data, f"{msg.subject}: {e}")
            return
        if record is None:
            return  # a read, a consumer change, a pull: not recorded
        # stored off the subscription's callback, so a slow publish does not hold up the others
        task = asyncio.create_task(self.record_change(record, msg.data))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def record_change(self, record: adminaudit.Record, advisory: bytes) -> None:
        """Store one change's record (tried again through an election or a reconnect); a record
        that cannot be stored goes to the dead letters with the advisory, never dropped silently."""
        if record.truncated:
            log.warning("auditor: API audit advisory %s is %d bytes, more than the record takes: stored "
                        "shortened", record.msg_id, len(advisory))
        try:
            await publish(self.js, s.ADMIN_AUDIT, record.body, {h.MSG_ID: record.msg_id},
                          patience=RECORD_PATIENCE_S)
        except Exception as e:
            await self._record_failed(advisory, f"recording admin change {record.msg_id} failed: {e!r}")

    async def _record_failed(self, advisory: bytes, reason: str) -> None:
        log.error("auditor: %s", reason)
        try:
            await dead_letter(self.js, self.name, s.JS_API_AUDIT, advisory, reason, {})
        except Exception:
            log.exception("auditor: dead-lettering the advisory failed too")

    async def _align_consumer(self) -> None:
        durable = self.durable("events")
        try:
            info = await self.js.consumer_info(s.EVENTS_STREAM, durable)
        except NotFoundError:
            return
        position = await self.projection.position()
        acked = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
        if acked > int(position["stream_seq"]):
            log.warning("auditor %s: consumer %s acknowledged stream seq %s but the projection %s holds up to %s; "
                        "replaying the stream from the start", self.instance, durable, acked, self.db_path,
                        position["stream_seq"])
            await self.js.delete_consumer(s.EVENTS_STREAM, durable)

    def register(self, broker: NatsBroker) -> None:
        self.pull(broker, s.EVENTS_ALL, s.EVENTS_STREAM, self.durable("events"), self.on_commit, traced=False)

        # Each query is answered for the tenant in its subject only (the server lets a credential
        # ask its own tenant's queries). The AsyncAPI document comes from interlock.contracts.catalog.
        self._answer(broker, "runs", RunsQuery, self.answer_runs)
        self._answer(broker, "status", RunQuery, self.answer_status)
        self._answer(broker, "timeline", RunQuery, self.answer_timeline)
        self._answer(broker, "approvals", RunsQuery, self.answer_approvals)
        self._answer(broker, "usage", UsageQuery, self.answer_usage)
        self._answer(broker, "failures", FailuresQuery, self.answer_failures)
        self._answer(broker, "feedback", FeedbackQuery, self.answer_feedback)  # issue 17

    def _answer(self, broker: NatsBroker, name: str, kind: type[Q],
                answer: Callable[[str, Q], Awaitable[QueryReply]]) -> None:
        async def handle(subject: str, query: Q) -> QueryReply:
            tenant, _ = s.parse_query(subject)
            refusal = body_disagrees("tenant", getattr(query, "tenant", None), tenant, subject)
            if refusal is not None:
                return QueryReply(ok=False, error=refusal)
            return await answer(tenant, query)

        self.answer(broker, s.queries(name), kind, handle, lambda why: QueryReply(ok=False, error=why))

    async def on_commit(self, msg: Msg) -> None:
        """One commit from ``IL_EVENTS`` (what ``pull_commits`` does, plus the stream sequence)."""
        stream_seq = int(msg.metadata.sequence.stream)
        try:
            tenant, run_id = s.parse_run_events(msg.subject)
            envelopes = codec.decode_commit_raw(msg.data)["events"]
        except ValueError as e:
            await self.projection.note_position(stream_seq)  # handled (dead-lettered): not a lost commit
            raise Poison(str(e)) from e
        # a commit the keyring does not vouch for is not projected (the store reports it: an
        # alert and a dead letter); `audit verify` shows it
        commit = stored_commit(stream_seq, msg.data, dict(msg.headers or {}), msg.metadata.timestamp.timestamp())
        await self.store.prepare([commit])
        if self.store.authenticity.check(s.run_events(tenant, run_id), commit, run_id, tenant) is not None:
            await self.projection.note_position(stream_seq)
            return
        ends = any(isinstance(e, dict) and e.get("type") in RUN_ENDED for e in envelopes)
        # projecting is off the run's causal path (nothing waits for it): the run's trace gets the
        # auditor's span for the commit that starts the run and the one that ends it, not one for
        # each of its ~20 commits (which made the auditor 40% of every trace's spans)
        starts = bool(envelopes) and isinstance(envelopes[0], dict) and envelopes[0].get("seq") == 1
        with self.handling("project", msg, tenant, run_id) if starts or ends else contextlib.nullcontext():
            await catch_up(self.projection, self.store, tenant, run_id, envelopes, stream_seq, self._measure)
        if ends:
            self._seal_soon.set()

    def _measure(self, tenant: str, run_id: str, envelopes: Envelopes) -> None:
        """The log's metrics (runs, steps, decisions, approvals) from newly projected events."""
        for observation in self.log_metrics.observe(tenant, run_id, envelopes):
            log_metrics.record(observation)
        log_metrics.publish_gauges(self.log_metrics, datetime.now(UTC))
        if self.alerts is not None:
            self._spawn(self._alert_on(tenant, run_id, envelopes))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    # -- alerts ----------------------------------------------------------------------------
    async def _alert_on(self, tenant: str, run_id: str, envelopes: Envelopes) -> None:
        """Alerts that follow from newly projected events (a run's SLA comes with its workflow)."""
        engine = self.alerts
        if engine is None:
            return
        raised = engine.observe(tenant, run_id, envelopes)
        started = next((e for e in envelopes if e.get("type") == ev.RunStarted.type_name), None)
        if started is not None and not engine.knows_workflow(run_id):
            data = started.get("data") or {}
            try:
                workflow = await self.registry.get(str(data.get("workflow_id")), str(data.get("workflow_version")))
                engine.set_workflow(run_id, workflow)
            except Exception as e:  # a deleted workflow: no SLA to check
                log.info("auditor: no workflow for run %s's SLA: %s", run_id, e)
        await self._publish_alerts(raised)

    async def _tick_alerts(self) -> None:
        engine = self.alerts
        while engine is not None:
            await asyncio.sleep(ALERT_TICK_S)
            now = datetime.now(UTC)
            try:
                raised = engine.tick(now)
                info = await self.js.stream_info(s.DLQ_STREAM)
                raised += engine.dead_letters(int(info.state.messages), now)
                await self._publish_alerts(raised)
            except Exception as e:  # an election, a reconnect: next tick
                log.warning("auditor: alert evaluation failed: %r", e)

    async def _publish_alerts(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            level = logging.WARNING if alert.state == "firing" else logging.INFO
            log.log(level, "alert %s %s: %s", alert.rule, alert.state, alert.summary)
            await publish(self.js, s.alerts(alert.tenant), alert.model_dump_json().encode(),
                          headers={h.MSG_ID: f"alert:{alert.alert_id}:{alert.state}:{alert.at.isoformat()}"})
            metrics.alerts_raised.add(1, {"rule": alert.rule, "state": alert.state, "tenant": alert.tenant})
        if alerts:
            firing: dict[tuple[str, str], int] = {}
            for alert in (self.alerts.firing.values() if self.alerts else ()):
                firing[(alert.rule, alert.tenant)] = firing.get((alert.rule, alert.tenant), 0) + 1
            metrics.gauges.alerts_firing = firing

    # -- queries ---------------------------------------------------------------------------
    @staticmethod
    def _limit(limit: int) -> int:
        return max(1, min(limit, MAX_QUERY_LIMIT))

    async def answer_runs(self, tenant: str, query: RunsQuery) -> QueryReply:
        before = (query.before_started_at, query.before_run_id or "") if query.before_started_at else None
        runs = await self.projection.runs(tenant=tenant, status=query.status, workflow_id=query.workflow_id,
                                          limit=self._limit(query.limit), idempotency_key=query.idempotency_key,
                                          started_after=query.started_after, started_before=query.started_before,
                                          before=before)
        return QueryReply(ok=True, result=runs)

    async def answer_status(self, tenant: str, query: RunQuery) -> QueryReply:
        status = await self.projection.status(query.run_id, tenant)
        if status is None:
            return QueryReply(ok=False, error=f"run {query.run_id} not found")
        return QueryReply(ok=True, result=status)

    async def answer_timeline(self, tenant: str, query: RunQuery) -> QueryReply:
        limit = None if query.limit is None else self._limit(query.limit)
        timeline = await self.projection.timeline(query.run_id, tenant, after_seq=query.after_seq, limit=limit)
        if timeline is None:
            return QueryReply(ok=False, error=f"run {query.run_id} not found")
        return QueryReply(ok=True, result=timeline)

    async def answer_approvals(self, tenant: str, query: RunsQuery) -> QueryReply:
        pending = await self.projection.approvals(tenant=tenant, limit=self._limit(query.limit))
        return QueryReply(ok=True, result=pending)

    async def answer_usage(self, tenant: str, query: UsageQuery) -> QueryReply:
        rows = await self.projection.usage(tenant=tenant, group_by=query.group_by, run_id=query.run_id,
                                           workflow_id=query.workflow_id, since=query.since,
                                           limit=self._limit(query.limit))
        return QueryReply(ok=True, result=rows)

    async def answer_failures(self, tenant: str, query: FailuresQuery) -> QueryReply:
        rows = await self.projection.failures(tenant=tenant, workflow_id=query.workflow_id, since=query.since,
                                              limit=self._limit(query.limit))
        return QueryReply(ok=True, result=rows)

    # -- rebuild ---------------------------------------------------------------------------
    async def answer_feedback(self, tenant: str, query: FeedbackQuery) -> QueryReply:
        if query.run_id is None and query.workflow_id is None:
            return QueryReply(ok=False, error="the feedback query needs a run_id or a workflow_id")
        rows = await self.projection.feedback(tenant=tenant, run_id=query.run_id, workflow_id=query.workflow_id,
                                              limit=max(0, min(query.limit, 100_000)))
        return QueryReply(ok=True, result=rows)

    async def rebuild(self, tenants: Sequence[str] | None = None, *, progress: ProgressCallback | None = None,
                      every: int = 10_000) -> RebuildStats:
        """Wipe this copy's projection and replay ``IL_EVENTS`` into it (``interlock audit rebuild``).

        Works on a running service (live consumption waits until the rebuild is done) and on one
        that was never started (it connects for the rebuild only). Rebuilding a file that another
        *process* is consuming into at the same time is not supported: stop that copy first.
        """
        if getattr(self, "store", None) is not None:
            return await self.projection.rebuild(self.store, tenants, progress=progress, every=every)
        nc = await connect(self.settings.nats_url, creds=self.settings.creds, name=f"interlock-{self.name}-rebuild")
        try:
            store = EventStore(nc, nc.jetstream(), service=self.name)
            return await self.projection.rebuild(store, tenants, progress=progress, every=every)
        finally:
            await self.projection.close()
            await nc.drain()


__all__ = ["AuditorService", "catch_up", "default_db_path", "instance_id"]
