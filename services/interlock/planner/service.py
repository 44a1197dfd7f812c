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
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import ValidationError

from interlock.contracts import authorship as a
from interlock.contracts import events as ev
from interlock.contracts import headers, routing, timing
from interlock.contracts import subjects as s
from interlock.contracts.messages import (
    DEFAULT_TENANT,
    CancelRequest,
    CommandReply,
    PolicyReply,
    PolicyRequest,
    PolicyStep,
    QueryReply,
    SchedulesQuery,
    SchedulesReply,
    SignedPolicyDecision,
    TimerFired,
    Trigger,
    UsageQuery,
)
from interlock.core import usage
from interlock.core.eventstore import RunExists, RunNotFound
from interlock.core.ids import run_id_for
from interlock.core.policy import record_decision
from interlock.core.run import IllegalTransition, Run, StepState
from interlock.core.sealed import SealedError
from interlock.core.workflow import Workflow
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

class PlannerService(Service):
    name = "planner"

    async def setup(self) -> None:
        self._spend: dict[str, tuple[float, usage.Usage]] = {}  # tenant -> (read at, spend in its window)
        self._policy_quiet_until = 0.0  # after a decision request timed out: ask again from then on
        self.decisions = {"asked": 0, "decided": 0, "unanswered": 0, "refused": 0}
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
        self.pull(broker, ">", s.TRIGGERS_STREAM, self.durable("triggers"), self.on_trigger)
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
                await self.with_decisions(run, workflow, set())
            else:
                run.deny(ev.RunDenied(step_id=None, reason=admission.reason, rule_ids=admission.rule_ids,
                                      snapshot_id=admission.snapshot_id))

        # the run's trace starts here: its root span's trace id is the run id
        with tracing.run_root(self.name, "start run", str(run_id), tenant=tenant, workflow=workflow.id,
                              instance=self.settings.instance), logs.bound(tenant=tenant, run_id=str(run_id)):
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
            ready_before = {sid for sid, st in run.steps.items() if st.status == "ready"}
            plan(run, workflow, outputs, run_input, datetime.now(UTC), spill, tenant_over)
            await self.payloads.store_all(spill.uploads)  # before the events that refer to them
            await self.with_decisions(run, workflow, ready_before)

        tenant_over = await self.tenant_overrun(tenant)
        await self.store.update(tenant, run_id, decide)

    async def with_decisions(self, run: Run, workflow: Workflow, ready_before: set[str]) -> None:
        """Record the policy service's decisions of the steps this pass made ready, so each lands
        in the same commit as its StepReady (issue 15). The policy service decides them (its live
        bundle) and signs each as a statement; one that does not answer in time, refuses, or answers
        with a decision the keyring does not vouch for leaves the steps ready alone: the policy
        service then decides them from its consumer, as it did before this request existed."""
        if run.terminal:
            return
        ready = [st for sid, st in run.steps.items() if st.status == "ready" and sid not in ready_before]
        if not ready:
            return
        for signed in await self.ask_policy(run, workflow, ready):
            if run.terminal:
                break
            try:
                record_decision(run, a.policy_decided(signed))
            except IllegalTransition as e:  # the step moved on in this pass: the consumer path decides
                log.info("run %s: decision of %s not recorded: %s", run.id, signed.statement.step_id, e)

    async def ask_policy(self, run: Run, workflow: Workflow, ready: list[StepState]) -> list[SignedPolicyDecision]:
        """The policy service's signed decisions of ``ready``, in order, or none at all."""
        if time.monotonic() < self._policy_quiet_until:
            return []
        tenant, run_id = run.tenant, str(run.id)
        expires = int((time.time() + timing.POLICY_REQUEST_TIMEOUT_S) * 1000)
        request = PolicyRequest(run_id=run_id, workflow_id=workflow.id, workflow_version=workflow.version,
                                expires_at_ms=expires, steps=[
            PolicyStep(step_id=st.step_id, step_type=st.step_type, topic=st.topic, input=st.input,
                       input_ref=st.input_ref, job_hash=st.job_hash) for st in ready])
        self.decisions["asked"] += 1
        try:
            msg = await self.nc.request(s.policy_decide(tenant), request.model_dump_json().encode(),
                                        timeout=timing.POLICY_REQUEST_TIMEOUT_S,
                                        headers=tracing.inject({}) or None)  # the decision's span joins the run's trace
            reply = PolicyReply.model_validate_json(msg.data)
        except NoRespondersError:  # no policy service runs (killed, restarting): its consumer decides later
            self.decisions["unanswered"] += 1
            return []
        except (NatsTimeoutError, TimeoutError):
            self.decisions["unanswered"] += 1
            self._policy_quiet_until = time.monotonic() + timing.POLICY_REQUEST_PAUSE_S
            log.warning("run %s: the policy service did not answer within %.2f s; the consumer path decides",
                        run_id, timing.POLICY_REQUEST_TIMEOUT_S)
            return []
        except ValidationError as e:
            self.decisions["refused"] += 1
            log.warning("run %s: the policy service's answer is not a PolicyReply: %s", run_id, e)
            return []
        problem = reply.error if not reply.ok else await self._vouch_problem(run, ready, reply.decisions)
        if problem is not None:
            self.decisions["refused"] += 1
            log.warning("run %s: no decisions from the policy service's answer (%s); the consumer path decides",
                        run_id, problem)
            return []
        self.decisions["decided"] += len(reply.decisions)
        return reply.decisions

    async def _vouch_problem(self, run: Run, ready: list[StepState], decisions: list[SignedPolicyDecision]
                             ) -> str | None:
        """Why the answer's decisions must not be appended, or None: one per step, in order, each
        for its step's job hash and, while signing is on, vouched for by the keyring as every
        reader will check it (a commit it refuses would be lost, StepReady events and all)."""
        if [d.statement.step_id for d in decisions] != [st.step_id for st in ready]:
            return "the decisions are not for the steps asked about"
        signing = self.store.authenticity.signer is not None
        if signing:
            await self.keyring.prepare(d.key_id for d in decisions)
        for st, signed in zip(ready, decisions, strict=True):
            envelope = {"run_id": str(run.id), "tenant": run.tenant, "type": ev.PolicyDecided.type_name,
                        "data": a.policy_decided(signed).model_dump(mode="json")}
            if signed.statement.job_hash != st.job_hash:
                return f"the decision of {st.step_id} is for another job hash"
            if signing:
                problem = self.keyring.keyring.policy_problem(envelope)
                if problem is not None:
                    return f"{problem[0]}: {problem[1]}"
            elif (mismatch := a.policy_mismatch(envelope, signed.statement)) is not None:
                return mismatch
        return None

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
