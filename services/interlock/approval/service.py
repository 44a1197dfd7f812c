"""The approval service: holds jobs that need a person, bound to the job hash and policy snapshot."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg

from interlock.approval.directory import ApproverDirectory
from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import ApprovalDecision, CommandReply, JobError, TimerFired
from interlock.core.eventstore import EventStoreError
from interlock.core.run import IllegalTransition, Run
from interlock.core.workflow import TemplateError, render_text
from interlock.planner.logic import base_step_id, template_context
from interlock.policy.bundles import BundleStore, LivePolicy
from interlock.runtime import timers
from interlock.runtime.service import Service, decode

log = logging.getLogger(__name__)


def needs_a_person(envelope: dict[str, Any]) -> bool:
    """Only decisions that wait for a person concern this service: it never loads other runs."""
    if envelope.get("type") != "PolicyDecided":
        return False
    data = envelope.get("data") or {}
    # decisions recorded before step_type existed carry none: look at those runs to be safe
    return data.get("decision") == "require_approval" or data.get("step_type", "approval") == "approval"


class ApprovalService(Service):
    name = "approval"

    async def setup(self) -> None:
        # the policy snapshot in force: a decision made after it changed does not release a job
        self.live = LivePolicy(BundleStore(self.js))
        await self.live.start()
        self.directory = ApproverDirectory(self.js)

    async def teardown(self) -> None:
        await self.live.stop()

    def register(self, broker: NatsBroker) -> None:
        self.pull_commits(broker, self.on_commit, wants=needs_a_person)
        self.pull(broker, s.timer_fired("approval_expiry"), s.TIMERS_STREAM, self.durable("timers"),
                  self.on_expiry)
        self.pull(broker, s.timer_fired("approval_escalation"), s.TIMERS_STREAM, self.durable("escalations"),
                  self.on_escalation)

        @broker.subscriber(s.CMD_APPROVE, queue="approval")
        async def approve(decision: ApprovalDecision) -> CommandReply:
            return await self.decide(decision, grant=True)

        @broker.subscriber(s.CMD_REJECT, queue="approval")
        async def reject(decision: ApprovalDecision) -> CommandReply:
            return await self.decide(decision, grant=False)

    async def reconcile(self, tenant: str, run_id: str) -> None:
        await self.on_commit(tenant, run_id, [])

    async def on_commit(self, tenant: str, run_id: str, envelopes: list[dict[str, Any]]) -> None:
        expiries: list[TimerFired] = []

        async def decide(run: Run) -> None:
            expiries.clear()
            if run.terminal:
                return
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            now = datetime.now(UTC)
            for state in list(run.steps.values()):
                if state.status != "awaiting_approval" or state.decision is None:
                    continue
                if state.approval is not None and state.approval.status == "requested":
                    continue
                spec = workflow.steps[base_step_id(state.step_id)]
                expires_ms = state.decision.approval_expires_ms or spec.expires_ms
                expires_at = now + timedelta(milliseconds=expires_ms) if expires_ms else None
                decision = state.decision
                escalate_at = (now + timedelta(milliseconds=decision.escalate_after_ms)
                               if decision.escalate_after_ms and decision.escalate_to_role else None)
                run.request_approval(ev.ApprovalRequested(
                    step_id=state.step_id, job_hash=state.job_hash, snapshot_id=decision.snapshot_id,
                    approver_role=decision.approver_role or spec.approvers,
                    prompt=self.prompt(run, spec.prompt, state.step_id), expires_at=expires_at,
                    escalate_at=escalate_at, escalate_to_role=decision.escalate_to_role if escalate_at else None,
                ))
                if expires_at is not None:
                    expiries.append(TimerFired(kind="approval_expiry", run_id=run.run_id, tenant=run.tenant,
                                               step_id=state.step_id, attempt=run.version, due_at=expires_at))
                if escalate_at is not None:
                    expiries.append(TimerFired(kind="approval_escalation", run_id=run.run_id, tenant=run.tenant,
                                               step_id=state.step_id, attempt=run.version, due_at=escalate_at))

        await self.store.update(tenant, run_id, decide)
        for timer in expiries:
            await timers.schedule(self.js, timer)

    def prompt(self, run: Run, template: str | None, step_id: str) -> str:
        if not template:
            return f"approve {step_id} of {run.workflow_id}"
        try:
            return render_text(template, template_context(run, {}, run.input), location=f"steps.{step_id}.prompt")
        except TemplateError as e:
            return f"{template} (could not render: {e})"

    async def decide(self, decision: ApprovalDecision, *, grant: bool) -> CommandReply:
        refusal = await self.directory.check(decision.approver, decision.role)
        if refusal is not None:
            log.warning("approval decision refused for run %s step %s: %s", decision.run_id, decision.step_id,
                        refusal)
            return CommandReply(ok=False, error=refusal)
        invalidated: list[str] = []

        async def apply(run: Run) -> None:
            invalidated.clear()
            state = run.steps.get(decision.step_id)
            request = state.approval if state is not None else None
            current = self.live.snapshot_id
            if grant and request is not None and request.status == "requested" \
                    and decision.job_hash == request.job_hash and request.snapshot_id != current:
                # the policy changed while the request waited: this approval was given for rules
                # no longer in force, so the job goes back to policy and is asked again if needed
                why = f"policy changed from {request.snapshot_id} to {current} while the request waited"
                run.invalidate_approval(ev.ApprovalInvalidated(step_id=decision.step_id, job_hash=request.job_hash,
                                                               reason=why, snapshot_id=current))
                invalidated.append(why)
                return
            if grant:
                run.grant_approval(ev.ApprovalGranted(
                    step_id=decision.step_id, job_hash=decision.job_hash, approver=decision.approver,
                    role=decision.role, reason=decision.reason), datetime.now(UTC))
                if state is not None and state.step_type == "approval":
                    run.succeed_step(ev.StepSucceeded(step_id=decision.step_id, attempt=0, worker=decision.approver,
                                                      output={"approved_by": decision.approver,
                                                              "reason": decision.reason}))
            else:
                run.reject_approval(ev.ApprovalRejected(
                    step_id=decision.step_id, job_hash=decision.job_hash, approver=decision.approver,
                    role=decision.role, reason=decision.reason))
                run.fail_step(ev.StepFailed(step_id=decision.step_id, attempt=0, final=True, worker=decision.approver,
                                            error=JobError(message=f"rejected by {decision.approver}: "
                                                           f"{decision.reason or 'no reason given'}",
                                                           retryable=False, kind="approval_rejected")))

        try:
            await self.store.update(decision.tenant, decision.run_id, apply, fresh=True)
        except IllegalTransition as e:
            return CommandReply(ok=False, error=e.why)
        except EventStoreError as e:
            return CommandReply(ok=False, error=str(e))
        if invalidated:
            return CommandReply(ok=False, error=f"{invalidated[0]}; the job was sent back to policy")
        verb = "approved" if grant else "rejected"
        log.info("run %s step %s %s by %s", decision.run_id, decision.step_id, verb, decision.approver)
        return CommandReply(ok=True, detail={"step_id": decision.step_id, "decision": verb})

    async def on_escalation(self, msg: Msg) -> None:
        timer = decode(msg, TimerFired)

        def escalate(run: Run) -> None:
            state = run.steps.get(timer.step_id or "")
            approval = state.approval if state else None
            if state is None or approval is None or approval.status != "requested" or run.terminal:
                return
            if approval.escalate_at is None or approval.escalate_at > timer.due_at:
                return  # a newer request (the policy changed) replaced the one this timer was for
            to_role = state.decision.escalate_to_role if state.decision else None
            if not to_role or approval.approver_role == to_role:
                return  # already escalated, or nothing to escalate to
            run.escalate_approval(ev.ApprovalEscalated(step_id=state.step_id, job_hash=approval.job_hash,
                                                       from_role=approval.approver_role, to_role=to_role))

        await self.store.update(timer.tenant, timer.run_id, escalate, fresh=True)

    async def on_expiry(self, msg: Msg) -> None:
        timer = decode(msg, TimerFired)

        def expire(run: Run) -> None:
            state = run.steps.get(timer.step_id or "")
            approval = state.approval if state else None
            if state is None or approval is None or approval.status != "requested" or run.terminal:
                return
            if approval.expires_at is None or approval.expires_at > datetime.now(UTC):
                return  # a newer request replaced the one this timer was for
            run.expire_approval(ev.ApprovalExpired(step_id=state.step_id, job_hash=approval.job_hash))
            run.fail_step(ev.StepFailed(step_id=state.step_id, attempt=0, final=True, error=JobError(
                message="approval request expired", retryable=False, kind="approval_expired")))

        await self.store.update(timer.tenant, timer.run_id, expire, fresh=True)
