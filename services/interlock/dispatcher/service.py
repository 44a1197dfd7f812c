"""The dispatcher: hands released jobs to agents and turns what comes back into outcomes.

The decisions are :mod:`interlock.dispatcher.rules` (pure); this module does the I/O around
them: it loads the workflow, resolves payloads and reads the heartbeats it has seen before a
rule runs, and publishes the rule's effects after its events are durable.

Order of effects, so a crash anywhere repeats nothing and loses nothing:
1. ``StepDispatched`` is appended (the allow decision is already in the log before it);
2. the job is published with its job id as the message id (a re-publish after a crash is dropped
   by JetStream's duplicate window);
3. deadline and lease timers are scheduled durably; when they fire, the run's state decides.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg

from interlock.contracts import headers, routing
from interlock.contracts import subjects as s
from interlock.contracts.messages import CancelNotice, Heartbeat, JobResult, Notification, TimerFired
from interlock.core.ids import job_id
from interlock.core.run import Run
from interlock.core.sealed import SealedError
from interlock.core.steps import base_step_id
from interlock.core.workflow import Workflow
from interlock.dispatcher import rules
from interlock.dispatcher.cache import ResultCache
from interlock.dispatcher.rules import Effect, PublishJob
from interlock.runtime import timers, tracing
from interlock.runtime.datakeys import DataKeyError
from interlock.runtime.publish import publish
from interlock.runtime.service import Poison, Service, decode

log = logging.getLogger(__name__)

MEMORY_LIMIT = 100_000  # job ids remembered per process (published, finished)


class DispatcherService(Service):
    name = "dispatcher"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._published: set[str] = set()
        self._heartbeats: dict[str, float] = {}  # job id -> monotonic time of the latest heartbeat
        # jobs whose outcome this process recorded: their lease and deadline timers, which fire
        # long after, are dropped without reloading the (by then finished) run
        self._finished_jobs: OrderedDict[str, None] = OrderedDict()
        self._rng = random.Random()
        self.cache: ResultCache  # the result cache (issue 17), once connected

    async def setup(self) -> None:
        self.cache = ResultCache(self.js)

    def register(self, broker: NatsBroker) -> None:
        self.pull_commits(broker, self.on_commit, wants=routing.ACTS_ON[self.name])
        self.pull(broker, s.RESULTS_ALL, s.RESULTS_STREAM, self.durable("results"), self.on_result)
        self.pull(broker, s.HEARTBEATS_ALL, s.RESULTS_STREAM, self.durable("heartbeats"), self.on_heartbeat)
        for kind in ("retry", "deadline", "lease"):
            self.pull(broker, s.timer_fired(kind), s.TIMERS_STREAM, self.durable(f"timer_{kind}"), self.on_timer)

    # -- effects -----------------------------------------------------------------------------
    async def carry_out(self, effects: Sequence[Effect]) -> None:
        """Publish what a rule decided, once its events are durable (notifications went before)."""
        await asyncio.gather(*(self.publish_job(e) for e in effects if isinstance(e, PublishJob)))
        for effect in effects:
            if isinstance(effect, TimerFired):
                await timers.schedule(self.js, effect)
            elif isinstance(effect, CancelNotice):
                await self.nc.publish(s.control_cancel(effect.tenant, effect.run_id),
                                      effect.model_dump_json().encode())

    async def publish_job(self, effect: PublishJob) -> None:
        # the job continues the trace from this handler's span (the rules' traceparent when not tracing)
        job = effect.job.model_copy(update={"trace_parent": tracing.current_traceparent() or effect.job.trace_parent})
        if job.input_ref is None:  # a large input travels as a reference
            job_input, input_ref = await self.payloads.offload(job.input)
            job = job.model_copy(update={"input": job_input, "input_ref": input_ref})
        # a re-publish after a crash carries the same id: JetStream's duplicate window drops it
        await publish(self.js, s.job(job.tenant, job.topic), job.model_dump_json().encode(),
                      headers={headers.MSG_ID: job.job_id, headers.TRACEPARENT: job.trace_parent or ""})
        self._published.add(job.job_id)
        if len(self._published) > MEMORY_LIMIT:
            self._published.clear()
        if effect.deadline is not None:
            await timers.schedule(self.js, effect.deadline)

    async def send_notifications(self, effects: Sequence[Effect]) -> None:
        """Sent before the step's success is appended, deduplicated by id: exactly once."""
        for note in effects:
            if isinstance(note, Notification):
                await publish(self.js, s.notify(note.tenant, note.channel), note.model_dump_json().encode(),
                              headers={headers.MSG_ID: f"notify:{note.run_id}:{note.step_id}"})

    # -- dispatching -------------------------------------------------------------------------
    async def on_commit(self, tenant: str, run_id: str, envelopes: list[dict[str, Any]]) -> None:
        notice = rules.cancel_notice(tenant, run_id, envelopes)
        if notice is not None:
            await self.carry_out([notice])
            return
        run = await self.dispatch(tenant, run_id)
        if not run.terminal:
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            await self.carry_out(rules.republish(run, workflow, envelopes, self._published))
        await self.carry_out(rules.retry_timers(run, envelopes))

    async def reconcile(self, tenant: str, run_id: str) -> None:
        """Dispatch what is due, re-offer jobs whose message may be lost, and time out attempts
        whose timers never fired (a backstop: the durable timers normally do this)."""
        run = await self.dispatch(tenant, run_id)
        workflow = await self.registry.get(run.workflow_id, run.workflow_version)
        await self.carry_out(rules.lost_jobs(run, workflow, self._published))
        for timer in rules.overdue_timers(run, workflow, datetime.now(UTC), self._heartbeats):
            await self.on_timer_fired(timer)

    async def dispatch(self, tenant: str, run_id: str, retry: TimerFired | None = None) -> Run:
        """Dispatch every released job and every retry that is due; publish notifications.
        ``retry``: the retry timer that fired (the run must have reached its retry)."""
        effects: list[Effect] = []

        async def decide(run: Run) -> None:
            effects.clear()
            if run.terminal:
                return
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            now = datetime.now(UTC)
            if retry is None:  # result cache (issue 17): a cached job's output instead of a dispatch
                await self.cache.use_cached(run, workflow, now)
            effects.extend(rules.retry_due(run, workflow, retry, now) if retry else rules.dispatch(run, workflow, now))
            await self.send_notifications(effects)

        handle, _ = await self.store.update(tenant, run_id, decide)
        await self.carry_out(effects)
        return handle.run

    # -- outcomes ----------------------------------------------------------------------------
    async def on_result(self, msg: Msg) -> None:
        result = decode(msg, JobResult)
        if msg.subject != s.result(result.tenant, result.run_id):
            raise Poison(f"result for run {result.run_id} arrived on {msg.subject}")
        self._heartbeats.pop(result.job_id, None)
        output = await self.payloads.resolve(result.output, result.output_ref) if result.ok else None
        effects: list[Effect] = []

        async def decide(run: Run) -> None:
            effects.clear()
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            sealed, sealed_output = await self.seal_result(workflow, result, output)
            effects.extend(rules.record_result(run, workflow, sealed, sealed_output, datetime.now(UTC),
                                               self._rng.random()))

        handle, _ = await self.store.update(result.tenant, result.run_id, decide)
        if result.ok:  # result cache (issue 17): the output, now durable, for later runs
            workflow = await self.registry.get(handle.run.workflow_id, handle.run.workflow_version)
            await self.cache.remember(handle.run, workflow, result.step_id, datetime.now(UTC))
        self._finished_jobs[result.job_id] = None  # only once the outcome is durable
        while len(self._finished_jobs) > MEMORY_LIMIT:
            self._finished_jobs.popitem(last=False)
        await self.carry_out(effects)

    async def seal_result(self, workflow: Workflow, result: JobResult, output: Any) -> tuple[JobResult, Any]:
        """The result with any sensitive output value that arrived in clear (a worker that does not
        use the SDK) sealed before it is recorded."""
        paths = workflow.sensitive_output_paths(base_step_id(result.step_id))
        if not result.ok or not self.sealer.rules.with_paths(paths).needs_sealing(output, "output"):
            return result, output
        try:
            sealed = self.sealer.seal_tree(result.tenant, result.run_id, output, "output", paths)
        except (DataKeyError, SealedError) as e:
            raise Poison(f"cannot seal the sensitive output of job {result.job_id}: {e}") from e
        value, ref = await self.payloads.offload(sealed)
        return result.model_copy(update={"output": value, "output_ref": ref}), sealed

    async def on_heartbeat(self, msg: Msg) -> None:
        beat = decode(msg, Heartbeat)
        first = beat.job_id not in self._heartbeats
        self._heartbeats[beat.job_id] = time.monotonic()
        effects: list[Effect] = []

        async def decide(run: Run) -> None:
            effects.clear()
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            effects.extend(rules.record_heartbeat(run, workflow, beat, datetime.now(UTC), first=first))

        await self.store.update(beat.tenant, beat.run_id, decide)
        await self.carry_out(effects)

    # -- timers ------------------------------------------------------------------------------
    async def on_timer(self, msg: Msg) -> None:
        timer = decode(msg, TimerFired)
        await self.on_timer_fired(timer)

    async def on_timer_fired(self, timer: TimerFired) -> None:
        if timer.kind == "retry":
            await self.dispatch(timer.tenant, timer.run_id, timer)
            return
        job = job_id(timer.run_id, timer.step_id, timer.attempt) if timer.step_id and timer.attempt else None
        if job in self._finished_jobs:
            return  # the attempt ended here already: nothing for the timer to do
        effects: list[Effect] = []

        async def decide(run: Run) -> None:
            effects.clear()
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            now = datetime.now(UTC)
            seen = self._heartbeats.get(job or "")
            seen_at = now - timedelta(seconds=time.monotonic() - seen) if seen is not None else None
            effects.extend(rules.timer_fired(run, workflow, timer, now, heartbeat_seen_at=seen_at,
                                             jitter=self._rng.random()))

        await self.store.update(timer.tenant, timer.run_id, decide)
        await self.carry_out(effects)
