"""The planner: starts runs from triggers and, after every outcome, decides what happens next."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from pydantic import ValidationError

from interlock.contracts import events as ev
from interlock.contracts import headers, routing
from interlock.contracts import subjects as s
from interlock.contracts.messages import (
    DEFAULT_TENANT,
    CancelRequest,
    CommandReply,
    QueryReply,
    SchedulesQuery,
    SchedulesReply,
    TimerFired,
    Trigger,
    UsageQuery,
)
from interlock.core import usage
from interlock.core.eventstore import RunExists, RunNotFound
from interlock.core.ids import run_id_for
from interlock.core.run import IllegalTransition, Run
from interlock.core.sealed import SealedError
from interlock.planner.intervene import Interventions
from interlock.planner.logic import Spill, plan
from interlock.planner.schedules import Schedules
from interlock.runtime import logs, timers, tracing
from interlock.runtime.datakeys import DataKeyError
from interlock.runtime.policy import BundleStore, LivePolicy
from interlock.runtime.registry import WorkflowNotFound
from interlock.runtime.service import Poison, Service, body_disagrees, decode

log = logging.getLogger(__name__)

SPEND_CACHE_S = 2.0  # how long a tenant's spend read from the auditor is reused

PROGRESS_EVENTS = routing.ACTS_ON["planner"]

def trigger_lane(msg: Msg) -> str | None:
    """A trigger that asks for a fast-lane priority is started before slow-lane work here (#16);
    any other (a raw trigger subject's input, no priority: the workflow's default) counts as slow."""
    if b'"priority"' not in msg.data or not s.is_trigger_subject(msg.subject):
        return None
    try:
        priority = json.loads(msg.data).get("priority")
    except (ValueError, AttributeError):
        return None  # the handler refuses it
    return routing.lane_of(priority) if isinstance(priority, int) else None


class PlannerService(Service):
    name = "planner"

    async def setup(self) -> None:
        self._spend: dict[str, tuple[float, usage.Usage]] = {}  # tenant -> (read at, spend in its window)
        self.policy = LivePolicy(BundleStore(self.js))
        await self.policy.start()
        # workflow schedules (issue 16): ticks on IL_TIMERS, each run started by start_from_trigger
        self.schedules = Schedules(self.js, self.registry, self.store, self.start_from_trigger)
        await self.schedules.start()

    async def teardown(self) -> None:
        await self.schedules.stop()
        await self.policy.stop()

    def register(self, broker: NatsBroker) -> None:
        # the whole triggers stream: subjects.TRIGGERS_ALL and the workflows' own trigger subjects, which
        # the registry adds to the stream when a workflow declares them
        self.pull(broker, ">", s.TRIGGERS_STREAM, self.durable("triggers"), self.on_trigger, lane=trigger_lane)
        self.pull_commits(broker, self.on_commit, wants=PROGRESS_EVENTS)
        self.pull(broker, s.timer_fired("run_timeout"), s.TIMERS_STREAM, self.durable("timers"), self.on_timer)
        self.pull(broker, s.schedule_fired(), s.TIMERS_STREAM, self.durable("schedules"), self.schedules.on_tick)
        self.answer(broker, s.queries("schedules"), SchedulesQuery, self.schedules.on_query,
                    lambda why: SchedulesReply(ok=False, error=why))

        self.answer(broker, s.commands("cancel"), CancelRequest, self.on_cancel,
                    lambda why: CommandReply(ok=False, error=why), keep_invalid=True)
        Interventions(self).register(broker)  # retry, skip, resume, pause, unpause, feedback (issue 17)

    async def on_trigger(self, msg: Msg) -> None:
        tenant, trigger = await self.parse_trigger(msg)
        await self.start_from_trigger(tenant, trigger)

    async def start_from_trigger(self, tenant: str, trigger: Trigger) -> None:
        """Start the run ``trigger`` names in ``tenant`` (a trigger message's, or a schedule's tick)."""
        try:
            workflow = await self.registry.get(trigger.workflow_id, trigger.workflow_version)
        except WorkflowNotFound as e:
            raise Poison(str(e)) from e
        run_id = run_id_for(tenant, workflow.id, trigger.idempotency_key)
        trigger = self.seal_trigger(tenant, str(run_id), trigger, workflow.sensitive_paths("input"))
        run_input, input_ref = await self.payloads.offload(trigger.input)
        started = ev.RunStarted(
            workflow_id=workflow.id, workflow_version=workflow.version, definition_hash=workflow.content_hash,
            input=run_input, input_ref=input_ref, idempotency_key=trigger.idempotency_key, tenant=tenant,
            requested_by=trigger.requested_by, rerun_of=trigger.rerun_of, reused_outputs=trigger.reuse_outputs,
            priority=trigger.priority,  # #16: the dispatcher's gate orders waiting jobs by it
            # #16: the lane of every commit of the run (a high-priority run never queues behind a backlog)
            lane=routing.lane_of(trigger.priority or workflow.priority),
        )
        admission = self.policy.engine.admit(
            tenant=tenant, workflow_id=workflow.id, workflow_version=workflow.version,
            run_input=trigger.input, idempotency_key=trigger.idempotency_key, requested_by=trigger.requested_by,
            now=datetime.now(UTC))

        tenant_over = await self.tenant_overrun(tenant)

        async def admit(run: Run) -> None:
            # the admission decision is recorded with the run's first event, before anything
            # runs, and the first steps are planned into the same commit (one append, not two)
            if admission.decision == "allow":
                run.admit(ev.RunAdmitted(snapshot_id=admission.snapshot_id, rule_ids=admission.rule_ids))
                spill = Spill(self.settings.inline_limit)
                plan(run, workflow, {}, trigger.input, datetime.now(UTC), spill, tenant_over)
                await self.payloads.store_all(spill.uploads)
            else:
                run.deny(ev.RunDenied(step_id=None, reason=admission.reason, rule_ids=admission.rule_ids,
                                      snapshot_id=admission.snapshot_id))

        # the run's trace starts here: its root span's trace id is the run id
        with tracing.run_root(self.name, "start run", str(run_id), tenant=tenant, workflow=workflow.id), \
                logs.bound(tenant=tenant, run_id=str(run_id)):
            try:
                await self.store.start_run(run_id, started, admit)
                log.info("run %s started: %s v%s (%s)", run_id, workflow.id, workflow.version, admission.decision)
                if workflow.timeout_ms:
                    await timers.schedule(self.js, TimerFired(
                        kind="run_timeout", run_id=str(run_id), tenant=tenant,
                        due_at=timers.due_in(workflow.timeout_ms)))
            except RunExists:
                log.info("trigger for existing run %s (idempotency key %r): nothing to start", run_id,
                         trigger.idempotency_key)
                await self.advance(tenant, str(run_id))

    def seal_trigger(self, tenant: str, run_id: str, trigger: Trigger, paths: frozenset[str]) -> Trigger:
        """The trigger with any sensitive value of its input that arrived in clear (a raw trigger
        subject, a client without keys) sealed, so the run's log never holds it in clear."""
        if not self.sealer.rules.with_paths(paths).needs_sealing(trigger.input, "input"):
            return trigger
        try:
            sealed_input = self.sealer.seal_tree(tenant, run_id, trigger.input, "input", paths)
        except (DataKeyError, SealedError) as e:
            raise Poison(f"cannot seal the sensitive values of run {run_id}'s input: {e}") from e
        return trigger.model_copy(update={"input": sealed_input})

    async def parse_trigger(self, msg: Msg) -> tuple[str, Trigger]:
        """(tenant, trigger): a Trigger on ``subjects.trigger(tenant, workflow_id)``, the tenant the
        subject's (a body naming another is poison); on a workflow's own trigger subject, any JSON
        body is its input, in tenant ``DEFAULT_TENANT`` (those subjects carry no tenant)."""
        if s.is_trigger_subject(msg.subject):
            try:
                tenant, workflow_id = s.parse_trigger(msg.subject)
                trigger = Trigger.model_validate_json(msg.data)
            except (ValidationError, s.SubjectError) as e:
                raise Poison(f"invalid trigger: {e}") from e
            if trigger.workflow_id != workflow_id:
                raise Poison(f"trigger for workflow {trigger.workflow_id!r} was sent to {msg.subject}, "
                             f"expected {s.trigger(tenant, trigger.workflow_id)}")
            refusal = body_disagrees("tenant", trigger.tenant, tenant, msg.subject)
            if refusal is not None:
                raise Poison(refusal)
            return tenant, trigger.model_copy(update={"tenant": tenant})
        declared = (await self.registry.trigger_subjects()).get(msg.subject)
        if declared is None:
            raise Poison(f"no registered workflow is triggered by {msg.subject}")
        workflow_id = declared
        try:
            body: Any = Trigger.model_validate_json(msg.data).model_dump()
        except ValidationError:
            body = None
        if body is not None and body.get("workflow_id") == workflow_id:
            trigger = Trigger.model_validate(body)
            refusal = body_disagrees("tenant", trigger.tenant, DEFAULT_TENANT, msg.subject)
            if refusal is not None:
                raise Poison(refusal)
            return DEFAULT_TENANT, trigger.model_copy(update={"tenant": DEFAULT_TENANT})
        try:
            payload = json.loads(msg.data or b"null")
        except ValueError as e:
            raise Poison(f"trigger on {msg.subject} is not JSON: {e}") from e
        key = (msg.headers or {}).get(headers.MSG_ID) or hashlib.sha256(msg.data).hexdigest()
        return DEFAULT_TENANT, Trigger(workflow_id=workflow_id, input=payload, idempotency_key=key,
                                       tenant=DEFAULT_TENANT, requested_by=f"subject:{msg.subject}")

    async def on_commit(self, tenant: str, run_id: str, envelopes: list[dict[str, Any]]) -> None:
        await self.advance(tenant, run_id)

    async def on_timer(self, msg: Msg) -> None:
        timer = decode(msg, TimerFired)

        async def decide(run: Run) -> None:
            if not run.terminal:
                workflow = await self.registry.get(run.workflow_id, run.workflow_version)
                run.time_out(ev.RunTimedOut(timeout_ms=workflow.timeout_ms or 0))

        await self.store.update(timer.tenant, timer.run_id, decide, fresh=True)

    async def on_cancel(self, subject: str, request: CancelRequest) -> CommandReply:
        """A cancel on ``il.cmd.{tenant}.cancel.{principal}``: the run's tenant and who cancels are
        the subject's; a body naming others is refused."""
        tenant, _, principal = s.parse_command(subject)
        refusal = (body_disagrees("tenant", request.tenant, tenant, subject)
                   or body_disagrees("canceller", request.by, principal, subject))
        if refusal is not None:
            return CommandReply(ok=False, error=refusal)
        return await self.cancel(tenant, principal, request)

    async def cancel(self, tenant: str, by: str, request: CancelRequest) -> CommandReply:
        def decide(run: Run) -> None:
            run.cancel(ev.RunCancelled(by=by, reason=request.reason))

        try:
            await self.store.update(tenant, request.run_id, decide, fresh=True)
        except (IllegalTransition, RunNotFound) as e:
            return CommandReply(ok=False, error=str(e))
        return CommandReply(ok=True, detail={"run_id": request.run_id, "status": "cancelled"})

    async def reconcile(self, tenant: str, run_id: str) -> None:
        await self.advance(tenant, run_id)

    async def advance(self, tenant: str, run_id: str) -> None:
        async def decide(run: Run) -> None:
            if run.terminal:
                return
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            outputs = {sid: await self.payloads.resolve(st.output, st.output_ref)
                       for sid, st in run.steps.items() if st.output_ref is not None}
            run_input = await self.payloads.resolve(run.input, run.input_ref)
            spill = Spill(self.settings.inline_limit)
            plan(run, workflow, outputs, run_input, datetime.now(UTC), spill, tenant_over)
            await self.payloads.store_all(spill.uploads)  # before the events that refer to them

        tenant_over = await self.tenant_overrun(tenant)
        await self.store.update(tenant, run_id, decide)

    async def tenant_overrun(self, tenant: str) -> usage.Overrun | None:
        """The tenant's spend over its budget in its window (INTERLOCK_TENANT_BUDGETS), if it is.

        The spend comes from the auditor's usage query, cached for a few seconds. When the auditor
        does not answer the check is skipped (with a warning): a budget is a cost control, and
        failing open keeps runs moving through an auditor outage."""
        budget = self.settings.tenant_budgets.get(tenant)
        if budget is None:
            return None
        cached = self._spend.get(tenant)
        now = time.monotonic()
        if cached is None or now - cached[0] > SPEND_CACHE_S:
            since = datetime.now(UTC) - timedelta(seconds=budget.window_s)
            query = UsageQuery(group_by="tenant", since=since, limit=1)
            try:
                msg = await self.nc.request(s.query(tenant, "usage"), query.model_dump_json().encode(), timeout=2)
                reply = QueryReply.model_validate_json(msg.data)
                if not reply.ok:
                    raise RuntimeError(reply.error)
            except Exception as e:
                log.warning("tenant %s: budget not checked, the usage query failed: %r", tenant, e)
                return None
            rows = reply.result or []
            spent = usage.Usage(sum(int(r["input_tokens"] or 0) for r in rows),
                                sum(int(r["output_tokens"] or 0) for r in rows),
                                sum(float(r["cost_usd"] or 0) for r in rows))
            cached = self._spend[tenant] = (now, spent)
        return usage.overrun(cached[1], usage.parse_limits(budget.model_dump()))
