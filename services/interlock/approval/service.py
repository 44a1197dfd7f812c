"""The approval service: holds jobs that need a person, bound to the job hash and policy snapshot.

The decisions are :mod:`interlock.approval.rules` (pure); this module checks the approver
directory, reads the policy snapshot in force, and schedules the rules' timers.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg

from interlock.approval import rules
from interlock.contracts import subjects as s
from interlock.contracts.messages import ApprovalDecision, CommandReply, TimerFired
from interlock.core.eventstore import EventStoreError
from interlock.core.run import IllegalTransition, Run
from interlock.runtime import timers
from interlock.runtime.approvers import ApproverDirectory
from interlock.runtime.policy import BundleStore, LivePolicy
from interlock.runtime.service import Service, decode

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

        @broker.subscriber(s.CMD_APPROVE, queue="approval")
        async def approve(decision: ApprovalDecision) -> CommandReply:
            return await self.decide(decision, grant=True)

        @broker.subscriber(s.CMD_REJECT, queue="approval")
        async def reject(decision: ApprovalDecision) -> CommandReply:
            return await self.decide(decision, grant=False)

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

    async def decide(self, decision: ApprovalDecision, *, grant: bool) -> CommandReply:
        refusal = await self.directory.check(decision.approver, decision.role)
        if refusal is not None:
            log.warning("approval decision refused for run %s step %s: %s", decision.run_id, decision.step_id,
                        refusal)
            return CommandReply(ok=False, error=refusal)
        invalidated: list[str] = []

        def apply(run: Run) -> None:
            invalidated.clear()
            why = rules.apply_decision(run, decision, grant=grant, snapshot_id=self.live.snapshot_id,
                                       now=datetime.now(UTC))
            if why is not None:
                invalidated.append(why)

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
        await self.store.update(timer.tenant, timer.run_id, lambda run: rules.escalate(run, timer), fresh=True)

    async def on_expiry(self, msg: Msg) -> None:
        timer = decode(msg, TimerFired)
        await self.store.update(timer.tenant, timer.run_id, lambda run: rules.expire(run, timer, datetime.now(UTC)),
                                fresh=True)
