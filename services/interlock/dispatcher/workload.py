"""Workload controls around dispatching (issue 16): circuit breakers and agent-version routing.

The service asks :meth:`WorkloadControl.decide` about the jobs a run has due, inside the run's
update (so a retried update asks again and gets the same answer for the same job), hands the
decisions to :func:`interlock.dispatcher.rules.dispatch`, and reports every outcome with
:meth:`WorkloadControl.record_outcome`. Steps without ``breaker:`` or ``agent_version`` on
topics without a rollout cost one cached rollout lookup per topic and second.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from nats.js import JetStreamContext

from interlock.core.ids import job_id
from interlock.core.run import Run, StepState
from interlock.core.steps import base_step_id
from interlock.core.workflow import Workflow
from interlock.dispatcher import routing
from interlock.dispatcher.breaker import Breakers
from interlock.dispatcher.routing import Decision, FailFast, Hold, NoVersion, Rollouts


class WorkloadControl:
    def __init__(self, js: JetStreamContext, instance: str) -> None:
        self.breakers = Breakers(js, instance)
        self.rollouts = Rollouts(js)

    async def decide(self, run: Run, workflow: Workflow, due: Sequence[StepState], now: datetime
                     ) -> dict[str, Decision]:
        """A decision per due job step that is not simply 'any worker, now'."""
        decisions: dict[str, Decision] = {}
        for state in due:
            if state.compensation_of is not None:
                continue  # undoing goes out whatever the step's breaker or version range says
            spec = workflow.steps[base_step_id(state.step_id)]
            topic = state.topic or ""
            job = job_id(run.run_id, state.step_id, state.attempt + 1)
            if spec.breaker is not None:
                admission = await self.breakers.admit(spec.breaker, run.tenant, topic, job, now)
                if admission.action == "fail":
                    decisions[state.step_id] = FailFast(f"circuit breaker of topic {topic!r} is open: "
                                                        f"{admission.message}")
                    continue
                if admission.action == "hold":
                    decisions[state.step_id] = Hold(admission.reason, admission.until or now, admission.message,
                                                    admission.opened_at)
                    continue
            rollout = await self.rollouts.get(run.tenant, topic)
            if rollout is None and not spec.agent_version:
                continue
            live = await self.rollouts.live_versions(run.tenant, topic) if spec.agent_version else set()
            choice = routing.choose(job, spec.agent_version, rollout, live)
            if isinstance(choice, NoVersion):
                decisions[state.step_id] = Hold("no_agent_version", now + routing.NO_VERSION_RECHECK, choice.message)
            elif choice.version:
                decisions[state.step_id] = choice
        return decisions

    async def record_outcome(self, run: Run, workflow: Workflow, state: StepState, job: str, ok: bool,
                             now: datetime) -> None:
        """Count the outcome of the step's current attempt (``job``) in its breaker and its
        topic's rollout. Called once the outcome is durable; counting is idempotent by job id."""
        if state.job_id != job or not state.topic or state.compensation_of is not None:
            return
        spec = workflow.steps[base_step_id(state.step_id)]
        # raising leaves the result to be redelivered: the outcome is recorded once, counted again (idempotent)
        if spec.breaker is not None:
            await self.breakers.record(spec.breaker, run.tenant, state.topic, job, ok, now)
        if state.agent_version:
            latency = (now - state.dispatched_at).total_seconds() * 1000 if state.dispatched_at else 0.0
            await self.rollouts.record(run.tenant, state.topic, job, state.agent_version, ok, latency, now)
