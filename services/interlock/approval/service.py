"""The approval service: holds jobs that need a person, bound to the job hash and policy snapshot.

The decisions are :mod:`interlock.approval.rules` (pure); this module checks the approver
directory, reads the policy snapshot in force, and schedules the rules' timers.
"""

from __future__ import annotations

import functools
import logging
from datetime import UTC, datetime
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg

from interlock.approval import rules
from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import ApprovalDecision, CommandReply, TimerFired
from interlock.core.eventstore import EventStoreError
from interlock.core.run import IllegalTransition, Run
from interlock.runtime import timers
from interlock.runtime.approvers import ApproverDirectory
from interlock.runtime.policy import BundleStore, LivePolicy
from interlock.runtime.service import Service, body_disagrees, decode

log = logging.getLogger(__name__)


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
        self.pull_commits(broker, self.on_commit, wants=rules.needs_a_person)
        self.pull(broker, s.timer_fired("approval_expiry"), s.TIMERS_STREAM, self.durable("timers"),
                  self.on_expiry)
        self.pull(broker, s.timer_fired("approval_escalation"), s.TIMERS_STREAM, self.durable("escalations"),
                  self.on_escalation)

        for name, grant in (("approve", True), ("reject", False)):
            self.answer(broker, s.commands(name), ApprovalDecision, functools.partial(self.on_decision, grant=grant),
                        lambda why: CommandReply(ok=False, error=why), keep_invalid=True)

    async def on_decision(self, subject: str, decision: ApprovalDecision, *, grant: bool) -> CommandReply:
        """A decision sent on ``il.cmd.{tenant}.{approve|reject}.{principal}``: the tenant and the
        approver are the subject's; a body naming others is refused."""
        tenant, _, principal = s.parse_command(subject)
        refusal = (body_disagrees("tenant", decision.tenant, tenant, subject)
                   or body_disagrees("approver", decision.approver, principal, subject))
        if refusal is not None:
            log.warning("approval decision refused for run %s step %s: %s", decision.run_id, decision.step_id,
                        refusal)
            return CommandReply(ok=False, error=refusal)
        return await self.decide(tenant, principal, decision, grant=grant)

    async def reconcile(self, tenant: str, run_id: str) -> None:
        await self.on_commit(tenant, run_id, [])

    async def on_commit(self, tenant: str, run_id: str, envelopes: list[dict[str, Any]]) -> None:
        requested: list[TimerFired] = []

        async def decide(run: Run) -> None:
            requested.clear()
            if run.terminal:
                return
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            requested.extend(rules.request_approvals(run, workflow, datetime.now(UTC)))

        await self.store.update(tenant, run_id, decide)
        for timer in requested:
            await timers.schedule(self.js, timer)

    async def decide(self, tenant: str, principal: str, decision: ApprovalDecision, *, grant: bool) -> CommandReply:
        """``principal``'s decision on a run of ``tenant``. One from a principal without the step's
        role, or for another job hash, is refused and recorded (ApprovalRefused); the request stays
        pending."""
        roles = await self.directory.roles(principal)  # None: nobody is registered, roles are not enforced
        invalidated: list[str] = []
        refused: list[ev.ApprovalRefused] = []
        key_problem = await self._key_problem(decision, principal)

        def apply(run: Run) -> None:
            invalidated.clear()
            refused.clear()
            # nobody, not even a service, decides for a person without that person's key
            why = key_problem or (rules.statement_problem(run, decision, principal, tenant, grant=grant,
                                                          now=datetime.now(UTC)) if self.require_signed else None)
            refusal = (rules.signature_refusal(run, decision, principal, why, grant=grant) if why is not None
                       else rules.refusal(run, decision, principal, roles, grant=grant))
            if why is not None and refusal is None:
                raise IllegalTransition(run.run_id, "approve" if grant else "reject", why, decision.step_id)
            if refusal is not None:
                run.refuse_approval(refusal)
                refused.append(refusal)
                return
            why = rules.apply_decision(run, decision, principal, grant=grant, snapshot_id=self.live.snapshot_id,
                                       now=datetime.now(UTC))
            if why is not None:
                invalidated.append(why)

        try:
            await self.store.update(tenant, decision.run_id, apply, fresh=True)
        except IllegalTransition as e:
            return CommandReply(ok=False, error=e.why)
        except EventStoreError as e:
            return CommandReply(ok=False, error=str(e))
        if refused:
            error = rules.refusal_message(decision.run_id, refused[0])
            log.warning("approval decision refused: %s", error)
            return CommandReply(ok=False, error=error)
        if invalidated:
            return CommandReply(ok=False, error=f"{invalidated[0]}; the job was sent back to policy")
        verb = "approved" if grant else "rejected"
        log.info("run %s step %s %s by %s", decision.run_id, decision.step_id, verb, principal)
        return CommandReply(ok=True, detail={"step_id": decision.step_id, "decision": verb})

    @property
    def require_signed(self) -> bool:
        return self.settings.signing == "on"

    async def _key_problem(self, decision: ApprovalDecision, principal: str) -> str | None:
        """Why the decision's signature does not hold (the key is not the principal's, unknown,
        revoked, or not a person's; the signature is not over this statement), or None."""
        if decision.signed is None:
            return "the decision is not signed (sign it with your own key: the CLI and the client do)" \
                if self.require_signed else None
        await self.keyring.prepare([decision.signed.key_id])
        problem = self.keyring.approval_problem(decision.signed, principal=principal)
        return None if problem is None else f"signature refused ({problem[0]}): {problem[1]}"

    async def on_escalation(self, msg: Msg) -> None:
        timer = decode(msg, TimerFired)
        await self.store.update(timer.tenant, timer.run_id, lambda run: rules.escalate(run, timer), fresh=True)

    async def on_expiry(self, msg: Msg) -> None:
        timer = decode(msg, TimerFired)
        await self.store.update(timer.tenant, timer.run_id, lambda run: rules.expire(run, timer, datetime.now(UTC)),
                                fresh=True)
