"""The planner's workflow schedules: durable tick timers, one run per tick, the schedules query.

Each scheduled workflow has one pending tick: a JetStream message schedule on
``subjects.schedule_timer(tenant, workflow_id)`` (the server keeps one per subject, so setting it
again replaces it). When it comes due the server publishes it to ``subjects.schedule_fired()``,
whose durable consumer every planner copy shares; the copy that gets it applies the missed-tick
policy (:func:`interlock.core.schedule.decide`), starts the tick's run through the planner's normal
start path with idempotency key ``schedule:{tick}`` (the run id comes from tenant, workflow and key,
so a tick handled twice still starts one run) and sets the next tick.

Applying, updating or removing a workflow changes its schedule: every planner copy watches the
workflows bucket's ``{workflow_id}.latest`` keys and sets the latest version's next tick (or cancels
the pending one). A tick of a schedule that changed since it was set is dropped. Nothing here is
kept only in memory: after a restart the watch finds every schedule's pending tick (and sets the
next one where none is pending), and ticks that came due meanwhile wait in the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.contracts.messages import ScheduleRow, SchedulesQuery, SchedulesReply, ScheduleTimer, Trigger
from interlock.core import schedule as sc
from interlock.core.eventstore import EventStore, RunNotFound
from interlock.core.ids import run_id_for
from interlock.core.workflow import Workflow
from interlock.runtime import timers
from interlock.runtime.registry import WorkflowNotFound, WorkflowRegistry
from interlock.runtime.service import decode

log = logging.getLogger(__name__)

LATEST_SUFFIX = ".latest"  # the registry's key naming a workflow's latest version
RESYNC_S = 60.0  # how often each copy checks every schedule's pending tick besides the watch

StartRun = Callable[[str, Trigger], Awaitable[None]]
Clock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(UTC)


class Schedules:
    """Sets, fires and lists the schedules of the registered workflows (one per planner copy)."""

    def __init__(self, js: JetStreamContext, registry: WorkflowRegistry, store: EventStore, start_run: StartRun,
                 clock: Clock = _now, resync_s: float = RESYNC_S) -> None:
        self.js = js
        self.registry = registry
        self.store = store
        self.start_run = start_run
        self.clock = clock
        self.resync_s = resync_s
        self._armed: dict[str, str] = {}  # workflow id -> the tenant whose tick this copy set last
        self._task: asyncio.Task[None] | None = None
        self._resync: asyncio.Task[None] | None = None

    # -- following the registry ------------------------------------------------------------------
    async def start(self) -> None:
        """Watch the workflows' latest versions; their schedules are set as the initial values arrive."""
        kv: KeyValue = await self.registry.kv()
        watcher = await kv.watch(f"*{LATEST_SUFFIX}", include_history=False)
        loaded = asyncio.get_running_loop().create_future()

        async def follow() -> None:
            try:
                async for entry in watcher:
                    if entry is None:  # the initial values are in
                        if not loaded.done():
                            loaded.set_result(None)
                        continue
                    deleted = entry.operation is not None and str(entry.operation).upper().endswith(("DEL", "PURGE"))
                    await self.ensure(entry.key.removesuffix(LATEST_SUFFIX), deleted=deleted)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a closed connection; every tick handled sets the next one anyway
                log.warning("schedules: the workflows watch ended: %r", e)
            finally:
                if not loaded.done():
                    loaded.set_result(None)

        self._task = asyncio.create_task(follow(), name="schedules-watch")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(loaded), 10)
        if self.resync_s > 0:
            self._resync = asyncio.create_task(self._resync_loop(), name="schedules-resync")

    async def _resync_loop(self) -> None:
        """Every ``resync_s``, every schedule's tick again (a watch that ended, a tick dead-lettered)."""
        while True:
            await asyncio.sleep(self.resync_s)
            try:
                for workflow_id in sorted({wf for wf, _ in await self.registry.list()}):
                    await self.ensure(workflow_id)
            except Exception as e:  # a reconnect or an election: next time
                log.warning("schedules: resync failed: %r", e)

    async def stop(self) -> None:
        for task in (self._task, self._resync):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def ensure(self, workflow_id: str, *, deleted: bool = False) -> None:
        """Make the pending tick of ``workflow_id`` match its latest version's schedule."""
        try:
            workflow = None if deleted else await self.registry.get(workflow_id)
        except WorkflowNotFound:
            workflow = None
        except Exception as e:  # a version that no longer loads: leave the schedule as it is
            log.error("schedules: cannot load workflow %s: %s", workflow_id, e)
            return
        schedule = workflow.schedule if workflow is not None else None
        previous = self._armed.get(workflow_id)
        if previous is not None and (schedule is None or schedule.tenant != previous):
            await self._cancel(previous, workflow_id)
        if workflow is None or schedule is None:
            return
        pending = await self._pending(schedule.tenant, workflow_id)
        if pending is not None and pending.schedule_hash == sc.schedule_hash(schedule):
            # already set (by another copy, before a restart): left alone, so a clock a little ahead of
            # the server's can never replace a tick that is about to fire with the one after it
            self._armed[workflow_id] = schedule.tenant
            return
        await self._arm(workflow, sc.next_after(schedule, self.clock()))

    async def _arm(self, workflow: Workflow, tick: datetime) -> None:
        schedule = workflow.schedule
        assert schedule is not None
        timer = ScheduleTimer(tenant=schedule.tenant, workflow_id=workflow.id, workflow_version=workflow.version,
                              schedule_hash=sc.schedule_hash(schedule), tick=tick)
        # no msg id: setting the same tick twice (two copies, a retry) just replaces it with itself, and a
        # schedule removed and added back within the duplicate window must be set again
        await timers.set_at(self.js, s.schedule_timer(schedule.tenant, workflow.id), timer.model_dump_json().encode(),
                            tick, s.schedule_fired())
        self._armed[workflow.id] = schedule.tenant
        log.debug("schedules: %s (%s) next tick %s", workflow.id, schedule.tenant, sc.iso(tick))

    async def _cancel(self, tenant: str, workflow_id: str) -> None:
        """Replace the pending tick with a message the server never fires (no schedule header)."""
        timer = ScheduleTimer(tenant=tenant, workflow_id=workflow_id, workflow_version="", schedule_hash="",
                              tick=self.clock(), cancelled=True)
        await timers.cancel(self.js, s.schedule_timer(tenant, workflow_id), timer.model_dump_json().encode())
        self._armed.pop(workflow_id, None)
        log.info("schedules: %s (%s) unscheduled", workflow_id, tenant)

    # -- a tick came due -------------------------------------------------------------------------
    async def on_tick(self, msg: Msg) -> None:
        timer = decode(msg, ScheduleTimer)
        if timer.cancelled:
            return
        try:
            workflow = await self.registry.get(timer.workflow_id)
        except WorkflowNotFound:
            log.info("schedules: tick %s of %s dropped: the workflow is not registered any more",
                     sc.iso(timer.tick), timer.workflow_id)
            return
        schedule = workflow.schedule
        if schedule is None or schedule.tenant != timer.tenant or sc.schedule_hash(schedule) != timer.schedule_hash:
            log.info("schedules: tick %s of %s (%s) dropped: the schedule changed since it was set",
                     sc.iso(timer.tick), timer.workflow_id, timer.tenant)
            await self.ensure(workflow.id)  # the current schedule's tick (normally set already by the watch)
            return
        decision = sc.decide(schedule, timer.tick, self.clock())
        # the next tick first: a run that cannot start (its redelivery retries it) never ends the schedule
        await self._arm(workflow, decision.next_tick)
        if decision.run_tick is not None:
            key = sc.tick_key(decision.run_tick)
            trigger = Trigger(workflow_id=workflow.id, workflow_version=workflow.version, idempotency_key=key,
                              input=sc.run_input(schedule, decision.run_tick, decision.missed),
                              requested_by=f"schedule:{schedule.expression}")
            if decision.missed:
                log.warning("schedules: %s (%s): %d tick(s) missed since %s; catching up once with tick %s",
                            workflow.id, schedule.tenant, decision.missed, sc.iso(timer.tick),
                            sc.iso(decision.run_tick))
            await self.start_run(schedule.tenant, trigger)
        else:
            log.warning("schedules: %s (%s): %d tick(s) missed since %s, skipped (missed: skip)", workflow.id,
                        schedule.tenant, decision.missed, sc.iso(timer.tick))

    # -- the schedules query ---------------------------------------------------------------------
    async def on_query(self, subject: str, query: SchedulesQuery) -> SchedulesReply:
        """The schedules of the query subject's tenant (never another's)."""
        tenant, _ = s.parse_query(subject)
        return SchedulesReply(ok=True, result=await self.rows(tenant, query.workflow_id))

    async def rows(self, tenant: str, workflow_id: str | None = None) -> list[ScheduleRow]:
        ids = sorted({wf for wf, _ in await self.registry.list()})
        rows: list[ScheduleRow] = []
        for wf_id in ids:
            if workflow_id is not None and wf_id != workflow_id:
                continue
            try:
                workflow = await self.registry.get(wf_id)
            except WorkflowNotFound:
                continue
            schedule = workflow.schedule
            if schedule is None or schedule.tenant != tenant:
                continue
            now = self.clock()
            pending = await self._pending(tenant, wf_id)
            armed = pending is not None and pending.schedule_hash == sc.schedule_hash(schedule)
            last = sc.latest_at_or_before(schedule, now)
            run_id = str(run_id_for(tenant, wf_id, sc.tick_key(last)))
            status = await self._status(tenant, run_id)
            rows.append(ScheduleRow(
                workflow_id=wf_id, workflow_version=workflow.version, tenant=tenant, cron=schedule.cron,
                every=schedule.every, timezone=schedule.timezone, missed=schedule.missed.value,
                next_tick=pending.tick if pending is not None and armed else sc.next_after(schedule, now),
                armed=armed, last_tick=last, last_run_id=run_id if status is not None else None,
                last_run_status=status))
        return rows

    async def _pending(self, tenant: str, workflow_id: str) -> ScheduleTimer | None:
        """The tick set for the schedule, if one is pending (a fired or cancelled one is not)."""
        try:
            stored = await self.js.get_last_msg(s.TIMERS_STREAM, s.schedule_timer(tenant, workflow_id))
        except NotFoundError:
            return None
        if not (stored.headers or {}).get(h.SCHEDULE):
            return None
        try:
            timer = ScheduleTimer.model_validate_json(stored.data or b"")
        except ValueError:
            return None
        return None if timer.cancelled else timer

    async def _status(self, tenant: str, run_id: str) -> str | None:
        try:
            return (await self.store.load(tenant, run_id, fresh=True)).run.status
        except RunNotFound:
            return None
