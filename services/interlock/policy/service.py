"""The policy service: decides every ready job before any side effect, under the active bundle."""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime
from typing import Any

from faststream.nats import NatsBroker

from interlock.contracts import events as ev
from interlock.contracts import routing
from interlock.contracts import subjects as s
from interlock.contracts.messages import AgentRegistration
from interlock.core.policy import PolicyEngine, request_for
from interlock.core.run import Run
from interlock.runtime.kvkeys import matching_keys
from interlock.runtime.policy import BundleStore, LivePolicy
from interlock.runtime.service import Service

AGENTS_REFRESH_S = 5.0


class PolicyService(Service):
    name = "policy"

    def __init__(self, *args: Any, engine: PolicyEngine | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fixed_engine = engine  # tests may pin an engine; otherwise the live bundle decides
        self._agents: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {}
        self._agents_at = 0.0

    async def setup(self) -> None:
        self.live = LivePolicy(BundleStore(self.js))
        await self.live.start()

    async def teardown(self) -> None:
        await self.live.stop()

    @property
    def engine(self) -> PolicyEngine:
        return self.fixed_engine or self.live.engine

    def register(self, broker: NatsBroker) -> None:
        self.pull_commits(broker, self.on_commit, wants=routing.ACTS_ON[self.name])

    async def agents(self, tenant: str, topic: str | None) -> tuple[tuple[str, ...], str]:
        """Capabilities and version ``tenant``'s agents registered for ``topic`` offer (cached briefly)."""
        if time.monotonic() - self._agents_at > AGENTS_REFRESH_S:
            found: dict[tuple[str, str], tuple[set[str], str]] = {}
            with contextlib.suppress(Exception):
                kv = await self.js.key_value(s.AGENTS_BUCKET)
                for key in await matching_keys(kv):
                    entry = await kv.get(key)
                    reg = AgentRegistration.model_validate_json(entry.value or b"{}")
                    caps, version = found.get((reg.tenant, reg.topic), (set(), ""))
                    found[(reg.tenant, reg.topic)] = (caps | set(reg.capabilities), max(version, reg.version))
            self._agents = {t: (tuple(sorted(c)), v) for t, (c, v) in found.items()}
            self._agents_at = time.monotonic()
        return self._agents.get((tenant, topic or ""), ((), ""))

    async def reconcile(self, tenant: str, run_id: str) -> None:
        await self.on_commit(tenant, run_id, [])

    async def on_commit(self, tenant: str, run_id: str, envelopes: list[dict[str, Any]]) -> None:
        async def decide(run: Run) -> None:
            if run.terminal:
                return
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            engine = self.engine
            now = datetime.now(UTC)
            for state in list(run.steps.values()):
                if state.status != "ready" or run.terminal:
                    continue
                capabilities, agent_version = await self.agents(run.tenant, state.topic)
                outcome = engine.decide(request_for(
                    workflow, state.step_id, tenant=run.tenant,
                    job_input=await self.payloads.resolve(state.input, state.input_ref), job_hash=state.job_hash,
                    now=now, topic=state.topic, step_type=state.step_type, capabilities=capabilities,
                    agent_version=agent_version))
                run.decide_policy(ev.PolicyDecided(
                    step_id=state.step_id, decision=outcome.decision, step_type=state.step_type,
                    snapshot_id=outcome.snapshot_id,
                    rule_ids=outcome.rule_ids, job_hash=state.job_hash, reason=outcome.reason,
                    approver_role=outcome.approver_role, approval_expires_ms=outcome.approval_expires_ms,
                    escalate_after_ms=outcome.escalate_after_ms, escalate_to_role=outcome.escalate_to_role,
                    constraints=outcome.constraints,
                ))
                if outcome.decision == "deny":
                    run.deny(ev.RunDenied(step_id=state.step_id, reason=outcome.reason or "denied by policy",
                                          rule_ids=outcome.rule_ids, snapshot_id=outcome.snapshot_id))

        await self.store.update(tenant, run_id, decide)
