"""The dispatcher: hands released jobs to agents and turns what comes back into outcomes.

The decisions are :mod:`interlock.dispatcher.rules` (pure); this module does the I/O around
them: it loads the workflow, resolves payloads and reads the heartbeats it has seen before a
rule runs, and publishes the rule's effects after its events are durable.

Order of effects, so a crash anywhere repeats nothing and loses nothing:
1. ``StepDispatched`` is appended (the allow decision is already in the log before it);
2. the job is published with its job id as the message id (a re-publish after a crash is dropped
   by JetStream's duplicate window);
3. deadline and lease timers are scheduled durably; when they fire, the run's state decides.

The dispatch gate (#16, :mod:`interlock.dispatcher.gate`, :mod:`interlock.dispatcher.slots`)
sits before step 1: a job under a concurrency or rate limit first takes a slot (or token) in the
gate bucket, else it is recorded as throttled (StepThrottled, consumed by the dispatcher only) and
waits; its slot is given back once its outcome is durable, which wakes the next waiting run.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Container, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg

from interlock.contracts import headers, routing
from interlock.contracts import subjects as s
from interlock.contracts.messages import (
    CancelNotice,
    GateScope,
    GateWaiter,
    Heartbeat,
    JobResult,
    Notification,
    PayloadRef,
    TimerFired,
)
from interlock.core import guard as guard_checks
from interlock.core.eventstore import RunNotFound
from interlock.core.ids import job_id
from interlock.core.run import ACTIVE_ATTEMPT, Run
from interlock.core.sealed import SealedError
from interlock.core.steps import base_step_id
from interlock.core.workflow import Step, Workflow
from interlock.dispatcher import gate, ledger, rules
from interlock.dispatcher.cache import ResultCache
from interlock.dispatcher.gate import LimitError
from interlock.dispatcher.guard import Guarded, guardrails_due
from interlock.dispatcher.routing import Route
from interlock.dispatcher.rules import Effect, PublishJob
from interlock.dispatcher.slots import Gatekeeper, QueueDepth
from interlock.dispatcher.workload import WorkloadControl
from interlock.runtime import timers, tracing
from interlock.runtime.datakeys import DataKeyError
from interlock.runtime.publish import publish
from interlock.runtime.service import Poison, Service, decode

log = logging.getLogger(__name__)

MEMORY_LIMIT = 100_000  # job ids remembered per process (published, finished)
GATE_SWEEP_GRACE_S = 10.0  # a gate entry younger than this may belong to a dispatch in progress
WakeEntry = tuple[gate.Limit, str, float]
"""What woke a run: the limit, the job that may pass it, and since when that job waits."""

WAITING = gate.Hold("waiting", "waits in the gate already")  # a throttled job that nothing woke: it stays


def _dropped(state: GateScope, job: str, holding: bool, stamp: float) -> tuple[GateScope, bool]:
    return ledger.drop_entry(state, job, holding, stamp)


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
        self._workload: WorkloadControl | None = None
        self._wakes: set[asyncio.Task[None]] = set()
        # runs being woken, and what woke them again meanwhile (coalesced: see _spawn_wake)
        self._waking: dict[tuple[str, str], list[WakeEntry | None]] = {}

    @property
    def workload(self) -> WorkloadControl:
        """Circuit breakers and agent-version routing (issue 16), once connected."""
        if self._workload is None:
            self._workload = WorkloadControl(self.js, self.settings.instance)
        return self._workload

    async def setup(self) -> None:
        self.cache = ResultCache(self.js)
        self.gatekeeper = Gatekeeper(self.js, self.settings.gate_limits)
        self.gatekeeper.on_free = self.wake_waiters
        await self.gatekeeper.start()
        self.queue = QueueDepth(self.js, self.settings.gate_limits.max_in_flight, self.wake)
        self.queue.start()

    async def teardown(self) -> None:
        await self.queue.stop()
        await self.gatekeeper.stop()
        for task in list(self._wakes):
            task.cancel()

    def register(self, broker: NatsBroker) -> None:
        self.pull_commits(broker, self.on_commit, wants=routing.ACTS_ON[self.name])
        # a high-priority run's results and heartbeats go first too (#16): by its cached run's lane;
        # a backlog's are not held while a fast run moves: they free the slots its jobs may wait for
        self.pull(broker, s.RESULTS_ALL, s.RESULTS_STREAM, self.durable("results"), self.on_result,
                  lane=self.lane_of_message, held=False)
        self.pull(broker, s.HEARTBEATS_ALL, s.RESULTS_STREAM, self.durable("heartbeats"), self.on_heartbeat,
                  lane=self.lane_of_message, held=False)
        # "breaker": a held job's re-check (circuit breaker open, no live agent version); "gate": a
        # rate-limited job's token is due
        for kind in ("retry", "deadline", "lease", "breaker", "gate"):
            self.pull(broker, s.timer_fired(kind), s.TIMERS_STREAM, self.durable(f"timer_{kind}"), self.on_timer)

    def lane_of_message(self, msg: Msg) -> str | None:
        """The lane of the run a result or heartbeat is for, if that run is cached here (else slow)."""
        run = s.run_of(msg.subject)
        return self.store.cached_lane(*run) if run is not None else None

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
        subject = s.versioned_job(job.tenant, job.agent_version, job.topic) if job.agent_version \
            else s.job(job.tenant, job.topic)
        await publish(self.js, subject, job.model_dump_json().encode(),
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
            handle = await self.store.load(tenant, run_id, fresh=True)
            await self.release_ended(handle.run)  # the run's slots and places in queues are free
            return
        run = await self.dispatch(tenant, run_id)
        if not run.terminal:
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            await self.carry_out(rules.republish(run, workflow, envelopes, self._published))
        await self.carry_out(rules.retry_timers(run, envelopes))

    async def reconcile(self, tenant: str, run_id: str) -> None:
        """Dispatch what is due, re-offer jobs whose message may be lost, and time out attempts
        whose timers never fired (a backstop: the durable timers normally do this)."""
        run = await self.dispatch(tenant, run_id, woken=True, fresh=True)
        workflow = await self.registry.get(run.workflow_id, run.workflow_version)
        await self.carry_out(rules.lost_jobs(run, workflow, self._published))
        for timer in rules.overdue_timers(run, workflow, datetime.now(UTC), self._heartbeats):
            await self.on_timer_fired(timer)

    async def dispatch(self, tenant: str, run_id: str, retry: TimerFired | None = None, *,
                       woken: bool = False, fresh: bool = False) -> Run:
        """Dispatch every released job and every retry that is due; publish notifications.
        ``retry``: the retry timer that fired (the run must have reached its retry); ``woken``:
        jobs that wait in the gate try again (a slot freed, a token is due, the sweep); ``fresh``:
        read the run to the log's end first — for anything but a commit delivered to this copy
        (a timer, a wake), since the copies share the commits and this one's cached run may lag
        by what another copy saw, and a decision on that would find nothing to do."""
        effects: list[Effect] = []

        async def decide(run: Run) -> None:
            effects.clear()
            if run.terminal:
                return
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            now = datetime.now(UTC)
            if retry is None:  # result cache (issue 17): a cached job's output instead of a dispatch
                await self.cache.use_cached(run, workflow, now)
            guarded = await self.check_guardrails(run, workflow)  # guard (#17)
            due = rules.due_jobs(run, now)
            control = await self.workload.decide(run, workflow, due, now) if due else None
            # the gate (#16) takes slots only for the jobs the breakers and versions let go
            stopped = {sid for sid, d in (control or {}).items() if not isinstance(d, Route)}
            held = await self.admit(run, workflow, now, woken=woken, skip=stopped)
            effects.extend(rules.retry_due(run, workflow, retry, now, control, held) if retry
                           else rules.dispatch(run, workflow, now, control, guarded, held))
            await self.send_notifications(effects)

        handle, _ = await self.store.update(tenant, run_id, decide, fresh=fresh)
        await self.carry_out(effects)
        return handle.run

    # -- the gate (#16) ----------------------------------------------------------------------
    async def admit(self, run: Run, workflow: Workflow, now: datetime, *, woken: bool = False,
                    skip: Container[str] = ()) -> dict[str, gate.Hold]:
        """The jobs due now that a limit holds back (step id -> why); every other one took its
        slots (and tokens). Costs nothing for a workflow no limit can apply to. A job that waits
        already (its StepThrottled is in the log) tries again only when ``woken``."""
        held: dict[str, gate.Hold] = {}
        if run.paused:  # nothing goes out while paused (rules.dispatch): no slot either
            return held
        limited = gate.gated(workflow, self.gatekeeper.config)
        for state in rules.due_jobs(run, now):
            if state.step_id in skip:  # a breaker holds it, or it fails fast: no slot
                continue
            if state.throttled == state.attempt + 1 and not woken:
                held[state.step_id] = WAITING
                continue
            if self.queue.full(run.tenant, state.topic or ""):
                held[state.step_id] = self.queue.hold(run.tenant, state.topic or "", run.run_id,
                                                      gate.priority_of(run, workflow))
                continue
            # counted before it is published, so a burst of decisions cannot all see room
            self.queue.published(run.tenant, state.topic or "")
            if not limited:
                continue
            try:
                limits = gate.limits_for(run, workflow, state, self.gatekeeper.config)
            except LimitError as e:
                held[state.step_id] = gate.Hold("key", f"cannot compute the step's limit key: {e}", fail=True)
                continue
            if not limits:
                continue
            waiter = GateWaiter(tenant=run.tenant, run_id=run.run_id, step_id=state.step_id,
                                priority=gate.priority_of(run, workflow), since=time.time())
            hold = await self.gatekeeper.admit(job_id(run.run_id, state.step_id, state.attempt + 1), waiter, limits)
            if hold is not None:
                held[state.step_id] = hold
        return held

    async def release_ended(self, run: Run, step_ids: Sequence[str] | None = None, jobs: Sequence[str] = ()) -> None:
        """Give back the slots of jobs whose attempt has stopped (:func:`ledger.releasable`; ``jobs``:
        a late result's or a timer's attempt too) and, for an ended run, the places its jobs held in
        queues, after the outcome is durable; wake the runs whose jobs may go."""
        if not gate.gated(workflow := await self.registry.get(run.workflow_id, run.workflow_version),
                          self.gatekeeper.config):
            return
        now = datetime.now(UTC)
        for sid in step_ids if step_ids is not None else list(run.steps):
            state = run.steps.get(sid)
            if state is None or state.step_type != "job":
                continue
            stopped = ledger.releasable(run, state, now, jobs)
            if not stopped:
                continue
            try:
                limits = gate.limits_for(run, workflow, state, self.gatekeeper.config)
            except LimitError:
                continue
            for job in stopped:  # the jobs that may go now are woken (wake_waiters)
                await self.gatekeeper.release(job, [lim for lim in limits if lim.kind == "concurrency"])

    async def sweep(self) -> int:
        try:
            await self.sweep_gate()
        except Exception as e:  # a reconnect, an election: the next pass; the runs' sweep still goes
            log.warning("dispatcher: gate sweep failed: %r", e)
        return await super().sweep()

    async def sweep_gate(self, grace: float = GATE_SWEEP_GRACE_S) -> int:
        """Give back slots held by jobs that the log shows stopped or never to be dispatched, and
        places held by jobs that no longer wait (a copy killed between taking a slot and recording
        the dispatch, or between the outcome and the release); a slot of a job that may still be
        dispatched is used by dispatching its run instead (:mod:`interlock.dispatcher.ledger`).
        Returns the entries removed."""
        removed = 0
        now = time.time()
        # every limit with a state or a waiting job (a waiter entry whose limit has no state is judged too)
        for key in dict.fromkeys([*await self.gatekeeper.keys(), *self.gatekeeper.index.by_limit]):
            state = await self.gatekeeper.view(key)
            entries = [(job, h.tenant, h.run_id, True, h.at) for job, h in state.holders.items() if now - h.at > grace]
            entries += [(job, w.tenant, w.run_id, False, w.since) for job, w in state.waiting.items()
                        if now - w.since > grace]
            for job, tenant, run_id, holding, stamp in entries:
                verdict = await self._judge(tenant, run_id, job, holding)
                if verdict == "dispatch":  # its slot goes to its dispatch (or the log shows why not)
                    try:
                        await self.dispatch(tenant, run_id, woken=True, fresh=True)
                    except Exception as e:  # the next pass judges it again
                        log.warning("dispatcher: gate sweep could not dispatch run %s: %r", run_id, e)
                        continue
                    verdict = await self._judge(tenant, run_id, job, holding)
                    # still not dispatched (a breaker holds it, say): the slot goes back unless
                    # that dispatch took it again (a new `at`; drop_entry leaves it then)
                    verdict = "release" if verdict == "dispatch" else verdict
                if verdict != "release":
                    continue
                if await self.gatekeeper.change(key, functools.partial(_dropped, job=job, holding=holding,
                                                                       stamp=stamp)):
                    removed += 1
                    log.info("dispatcher: gate %s: %s %s of run %s, which the log shows %s", key,
                             "gave back the slot of" if holding else "dropped", job, run_id,
                             "stopped or never to be dispatched" if holding else "not waiting")
        return removed

    async def _judge(self, tenant: str, run_id: str, job: str, holding: bool) -> ledger.Verdict:
        try:
            run: Run | None = (await self.store.load(tenant, run_id, fresh=True)).run
        except RunNotFound:
            run = None
        if holding:
            return ledger.holder_verdict(run, job, datetime.now(UTC))
        return ledger.waiter_verdict(run, job)

    def wake(self, runs: Sequence[tuple[str, str]]) -> None:
        """Dispatch what is due in these runs (their jobs may go now), in the background."""
        for tenant, run_id in dict.fromkeys(runs):
            self._spawn_wake(tenant, run_id, None)

    def wake_waiters(self, limit: gate.Limit, woken: Sequence[tuple[str, GateWaiter]]) -> None:
        """Dispatch the runs of waiting jobs that may pass ``limit`` now, in the background."""
        for job, waiter in woken:
            self._spawn_wake(waiter.tenant, waiter.run_id, (limit, job, waiter.since))

    def _spawn_wake(self, tenant: str, run_id: str, entry: WakeEntry | None) -> None:
        """Wake a run in the background, at most one wake per run at a time: a run woken again while
        its wake is out (every slot freed ranks the same head of the queue) is woken once more after
        it, so a wake that read the run before the slot was free is not lost and a burst of freed
        slots does not wake the same runs a hundred times each."""
        key = (tenant, run_id)
        if key in self._waking:
            self._waking[key].append(entry)
            return
        self._waking[key] = []
        task = asyncio.create_task(self._wake_coalesced(tenant, run_id, entry), name=f"dispatcher-wake-{run_id}")
        self._wakes.add(task)
        task.add_done_callback(self._wakes.discard)

    async def _wake_coalesced(self, tenant: str, run_id: str, entry: WakeEntry | None) -> None:
        key = (tenant, run_id)
        try:
            await self._wake(tenant, run_id, entry)
            while again := self._waking.get(key):
                self._waking[key] = []
                # once more, whatever woke it meanwhile: never a lost wake, at most one wake behind
                await self._wake(tenant, run_id, next((e for e in again if e is not None), None))
        finally:
            self._waking.pop(key, None)

    async def _wake(self, tenant: str, run_id: str, entry: WakeEntry | None = None) -> None:
        try:
            async with self.lanes.lane(self.store.cached_lane(tenant, run_id)):  # a fast-lane run's wake first
                run = await self.dispatch(tenant, run_id, woken=True, fresh=True)
            if run.terminal:
                await self.release_ended(run)
            if entry is not None and ledger.waiter_verdict(run, entry[1]) == "release":
                # its place outlived a decide that did not land (the run no longer waits on it): at
                # the head of the queue it would hold back every job behind it until the sweep
                limit, job, since = entry
                await self.gatekeeper.release(job, [limit], entry=(False, since))
        except RunNotFound:
            pass
        except Exception as e:  # the sweep dispatches it later
            log.warning("dispatcher: waking run %s failed: %r", run_id, e)

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
            guarded = await self.check_output(run, workflow, sealed, sealed_output)  # guard (#17)
            effects.extend(rules.record_result(run, workflow, sealed, sealed_output, datetime.now(UTC),
                                               self._rng.random(), guarded))

        handle, _ = await self.store.update(result.tenant, result.run_id, decide)
        if result.ok:  # result cache (issue 17): the output, now durable, for later runs
            workflow = await self.registry.get(handle.run.workflow_id, handle.run.workflow_version)
            await self.cache.remember(handle.run, workflow, result.step_id, datetime.now(UTC))
        self._finished_jobs[result.job_id] = None  # only once the outcome is durable
        await self.count_outcome(handle.run, result.step_id, result.job_id, result.ok)
        while len(self._finished_jobs) > MEMORY_LIMIT:
            self._finished_jobs.popitem(last=False)
        await self.carry_out(effects)
        await self.release_ended(handle.run, [result.step_id], [result.job_id])

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

    # -- guard checks (#17) -------------------------------------------------------------------
    async def _guarded(self, spec: Step, value: Any, root: str, value_ref: PayloadRef | None,
                       recorded: Any) -> Guarded:
        """Run ``spec``'s guard on ``value``; a changed (redacted) value is offloaded when large."""
        assert spec.guard is not None
        outcome = guard_checks.outcome(spec.guard, value, root)
        if outcome.action == "fail":
            return Guarded(outcome, spec.guard.approvers)
        if outcome.action == "none":
            return Guarded(outcome, spec.guard.approvers, recorded, value_ref)
        changed, ref = await self.payloads.offload(outcome.value)
        return Guarded(outcome, spec.guard.approvers, changed, ref)

    async def check_output(self, run: Run, workflow: Workflow, result: JobResult, output: Any) -> Guarded | None:
        """The guard verdicts on a successful result of the current attempt of a guarded job."""
        spec = workflow.steps.get(base_step_id(result.step_id))
        state = run.steps.get(result.step_id)
        if not result.ok or spec is None or spec.guard is None or state is None or state.compensation_of \
                or state.attempt != result.attempt or state.status not in ACTIVE_ATTEMPT or run.terminal:
            return None
        return await self._guarded(spec, output, "output", result.output_ref, result.output)

    async def check_guardrails(self, run: Run, workflow: Workflow) -> dict[str, Guarded]:
        """The verdicts of the released guardrail steps, on their (resolved) inputs."""
        checked: dict[str, Guarded] = {}
        for state in guardrails_due(run):
            spec = workflow.steps[base_step_id(state.step_id)]
            if spec.guard is None:
                continue
            value = await self.payloads.resolve(state.input, state.input_ref)
            checked[state.step_id] = await self._guarded(spec, value, "input", state.input_ref, state.input)
        return checked

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
        # the lease timer is the run's bookkeeping: a heartbeat that only renews it exports no span
        with tracing.under_run_root(beat.run_id):
            await self.carry_out(effects)

    # -- timers ------------------------------------------------------------------------------
    async def on_timer(self, msg: Msg) -> None:
        timer = decode(msg, TimerFired)
        await self.on_timer_fired(timer)

    async def count_outcome(self, run: Run, step_id: str, job: str, ok: bool) -> None:
        """The circuit breaker and rollout of the step's topic count the outcome (issue 16)."""
        state = run.steps.get(step_id)
        if state is not None and state.job_id == job:
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            await self.workload.record_outcome(run, workflow, state, job, ok, datetime.now(UTC))

    async def on_timer_fired(self, timer: TimerFired) -> None:
        if timer.kind == "retry":
            await self.dispatch(timer.tenant, timer.run_id, timer, fresh=True)
            return
        if timer.kind == "breaker":  # a held job looks again
            await self.dispatch(timer.tenant, timer.run_id, fresh=True)
            return
        if timer.kind == "gate":  # a rate-limited job's token is due
            await self.dispatch(timer.tenant, timer.run_id, woken=True, fresh=True)
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

        handle, _ = await self.store.update(timer.tenant, timer.run_id, decide, fresh=True)
        state = handle.run.steps.get(timer.step_id or "")
        if job is not None and state is not None and state.attempt == timer.attempt and state.error is not None \
                and state.error.kind == "timeout":  # the attempt timed out (now or before): a failure
            await self.count_outcome(handle.run, state.step_id, job, False)
        await self.carry_out(effects)
        if timer.step_id:
            await self.release_ended(handle.run, [timer.step_id], [job] if job else [])
