"""The policy service: decides every ready job before any side effect, under the active bundle."""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from faststream.nats import NatsBroker

from interlock.contracts import authorship as a
from interlock.contracts import events as ev
from interlock.contracts import routing
from interlock.contracts import subjects as s
from interlock.contracts.messages import AgentRegistration, PolicyReply, PolicyRequest, SignedPolicyDecision
from interlock.core.policy import PolicyEngine, decide_step, hash_problem, record_decision
from interlock.core.run import Run
from interlock.core.workflow import Workflow
from interlock.runtime.policy import BundleStore, LivePolicy
from interlock.runtime.service import Service

log = logging.getLogger(__name__)

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
        # only commits routed to it: what the planner's request for decisions left undecided
        self.pull_commits(broker, self.on_commit, wants=routing.ACTS_ON[self.name])
        self.answer(broker, s.policy_decides(), PolicyRequest, self.on_request,
                    lambda why: PolicyReply(ok=False, error=why))

    async def agents(self, tenant: str, topic: str | None) -> tuple[tuple[str, ...], str]:
        """Capabilities and version ``tenant``'s agents registered for ``topic`` offer (cached briefly)."""
        if time.monotonic() - self._agents_at > AGENTS_REFRESH_S:
            found: dict[tuple[str, str], tuple[set[str], str]] = {}
            with contextlib.suppress(Exception):
                kv = await self.js.key_value(s.AGENTS_BUCKET)
                for key in await kv.keys():
                    entry = await kv.get(key)
                    reg = AgentRegistration.model_validate_json(entry.value or b"{}")
                    caps, version = found.get((reg.tenant, reg.topic), (set(), ""))
                    found[(reg.tenant, reg.topic)] = (caps | set(reg.capabilities), max(version, reg.version))
            self._agents = {t: (tuple(sorted(c)), v) for t, (c, v) in found.items()}
            self._agents_at = time.monotonic()
        return self._agents.get((tenant, topic or ""), ((), ""))

    async def decided(self, tenant: str, workflow: Workflow, *, step_id: str, step_type: str, topic: str | None,
                      job_input: Any, job_hash: str, now: datetime) -> ev.PolicyDecided:
        """The PolicyDecided for one ready step under the live bundle: the one way both the
        request handler and the consumer decide."""
        capabilities, agent_version = await self.agents(tenant, topic)
        return decide_step(self.engine, workflow, tenant=tenant, step_id=step_id, step_type=step_type, topic=topic,
                           job_input=job_input, job_hash=job_hash, now=now, capabilities=capabilities,
                           agent_version=agent_version)

    async def on_request(self, subject: str, request: PolicyRequest) -> PolicyReply:
        """The planner's request on ``il.policy.decide.{tenant}``: the decisions of steps it is about
        to mark ready, each signed as a statement with this instance's key. Refused (ok false, the
        planner then appends the steps alone) when a step's job hash is not its input's."""
        if request.expires_at_ms is not None and time.time() * 1000 > request.expires_at_ms:
            return PolicyReply(ok=False, error="the request expired before it was handled")
        try:
            tenant = s.parse_policy_decide(subject)
            workflow = await self.registry.get(request.workflow_id, request.workflow_version)
            now = datetime.now(UTC)
            at = now.isoformat().replace("+00:00", "Z")
            signer = self.store.authenticity.signer
            decisions = []
            for step in request.steps:
                job_input = await self.payloads.resolve(step.input, step.input_ref)
                problem = hash_problem(workflow, step_id=step.step_id, topic=step.topic, job_input=job_input,
                                       claimed=step.job_hash)
                if problem is not None:
                    return PolicyReply(ok=False, error=problem)
                decided = await self.decided(tenant, workflow, step_id=step.step_id, step_type=step.step_type,
                                             topic=step.topic, job_input=job_input, job_hash=step.job_hash, now=now)
                statement = a.policy_statement(tenant, request.run_id, decided, at)
                decisions.append(SignedPolicyDecision(
                    statement=statement, key_id=signer.key_id if signer else "",
                    signature=signer.sign_b64(a.policy_bytes(statement)) if signer else ""))
        except Exception as e:  # the planner falls back to the consumer path: say why at once
            log.warning("policy: cannot decide for run %s: %r", request.run_id, e)
            return PolicyReply(ok=False, error=f"{type(e).__name__}: {e}")
        return PolicyReply(ok=True, decisions=decisions)

    async def reconcile(self, tenant: str, run_id: str) -> None:
        await self.on_commit(tenant, run_id, [])

    async def on_commit(self, tenant: str, run_id: str, envelopes: list[dict[str, Any]]) -> None:
        """Decide every ready step the log holds undecided (the planner's request went unanswered,
        a retried step, an invalidated approval); a step already decided in the log is skipped."""
        async def decide(run: Run) -> None:
            if run.terminal:
                return
            workflow = await self.registry.get(run.workflow_id, run.workflow_version)
            now = datetime.now(UTC)
            for state in list(run.steps.values()):
                if state.status != "ready" or run.terminal:
                    continue
                record_decision(run, await self.decided(
                    run.tenant, workflow, step_id=state.step_id, step_type=state.step_type, topic=state.topic,
                    job_input=await self.payloads.resolve(state.input, state.input_ref), job_hash=state.job_hash,
                    now=now))

        # this consumer is delivered only the commits routed to it: the cached run may lag the log
        await self.store.update(tenant, run_id, decide, fresh=True)
