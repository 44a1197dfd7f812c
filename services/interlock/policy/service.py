"""The policy service: decides every ready job before any side effect."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from faststream.nats import NatsBroker

from interlock.contracts import events as ev
from interlock.core.run import Run
from interlock.planner.logic import base_step_id
from interlock.policy.engine import BuiltinPolicy, JobRequest, PolicyEngine
from interlock.runtime.service import Service


class PolicyService(Service):
    name = "policy"

    def __init__(self, *args: Any, engine: PolicyEngine | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine: PolicyEngine = engine or BuiltinPolicy()

    def register(self, broker: NatsBroker) -> None:
        self.pull_commits(broker, self.on_commit, wants=frozenset({"StepReady"}))

    async def on_commit(self, tenant: str, run_id: str, envelopes: list[dict[str, Any]]) -> None:
        async def decide(run: Run) -> None:
            if run.terminal:
                return
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            now = datetime.now(UTC)
            for state in list(run.steps.values()):
                if state.status != "ready" or run.terminal:
                    continue
                spec = workflow.steps[base_step_id(state.step_id)]
                step_input = await self.payloads.resolve(state.input, state.input_ref)
                outcome = self.engine.decide(JobRequest(
                    tenant=run.tenant, workflow_id=run.workflow_id, workflow_version=run.workflow_version,
                    step_id=state.step_id, step_type=state.step_type, topic=state.topic,
                    labels=dict(spec.labels), input=step_input, job_hash=state.job_hash,
                    require_approval=spec.require_approval, approvers=spec.approvers, now=now,
                ))
                run.decide_policy(ev.PolicyDecided(
                    step_id=state.step_id, decision=outcome.decision, snapshot_id=outcome.snapshot_id,
                    rule_ids=outcome.rule_ids, job_hash=state.job_hash, reason=outcome.reason,
                    approver_role=outcome.approver_role, approval_expires_ms=outcome.approval_expires_ms,
                    constraints=outcome.constraints,
                ))
                if outcome.decision == "deny":
                    run.deny(ev.RunDenied(step_id=state.step_id, reason=outcome.reason or "denied by policy",
                                          rule_ids=outcome.rule_ids, snapshot_id=outcome.snapshot_id))

        await self.store.update(tenant, run_id, decide)
