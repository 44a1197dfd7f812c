"""Policy tooling behind ``interlock policy …``: eval, explain and simulate against the log."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from interlock.contracts import subjects as s
from interlock.core.workflow import Workflow
from interlock.planner.logic import base_step_id
from interlock.policy.cedar import CedarPolicy
from interlock.policy.engine import JobRequest


def request_for(workflow: Workflow, step_id: str, *, tenant: str, job_input: Any, job_hash: str = "",
                now: datetime | None = None, topic: str | None = None, step_type: str | None = None,
                capabilities: tuple[str, ...] = (), agent_version: str = "") -> JobRequest:
    """The policy request for one step of a workflow (the services and the tools build it alike)."""
    spec = workflow.steps[base_step_id(step_id)]
    return JobRequest(
        tenant=tenant, workflow_id=workflow.id, workflow_version=workflow.version, step_id=step_id,
        step_type=step_type or spec.type.value, topic=topic if topic is not None else spec.topic,
        labels=dict(spec.labels), input=job_input, job_hash=job_hash, require_approval=spec.require_approval,
        approvers=spec.approvers, now=now or datetime.now(UTC), capabilities=capabilities,
        agent_version=agent_version,
    )


@dataclass
class RecordedDecision:
    run_id: str
    tenant: str
    workflow_id: str
    workflow_version: str
    step_id: str
    step_type: str
    topic: str | None
    input: Any
    job_hash: str
    decision: str
    snapshot_id: str
    rule_ids: list[str]
    at: datetime


async def recent_decisions(nc: NATS, limit: int = 500) -> list[RecordedDecision]:
    """The last ``limit`` policy decisions in the event log, with the jobs they were about."""
    js = nc.jetstream()
    info = await js.stream_info(s.EVENTS_STREAM)
    last = info.state.last_seq
    # the jobs' StepReady events come shortly before their decisions: read a generous window
    window = max(1000, limit * 4)
    start = max(1, last - window + 1)
    sub = await js.subscribe(s.EVENTS_ALL, ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start))
    ready: dict[tuple[str, str], dict[str, Any]] = {}
    started: dict[str, dict[str, Any]] = {}
    out: list[RecordedDecision] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                break
            for e in json.loads(msg.data)["events"]:
                data = e["data"]
                if e["type"] == "RunStarted":
                    started[e["run_id"]] = data
                elif e["type"] == "StepReady":
                    ready[(e["run_id"], data["step_id"])] = data
                elif e["type"] == "PolicyDecided":
                    job = ready.get((e["run_id"], data["step_id"]))
                    run = started.get(e["run_id"])
                    if job is None or run is None:
                        continue  # the job's StepReady is before the window
                    out.append(RecordedDecision(
                        run_id=e["run_id"], tenant=e["tenant"], workflow_id=run["workflow_id"],
                        workflow_version=run["workflow_version"], step_id=data["step_id"],
                        step_type=job.get("step_type", "job"), topic=job.get("topic"), input=job.get("input"),
                        job_hash=data["job_hash"], decision=data["decision"], snapshot_id=data["snapshot_id"],
                        rule_ids=list(data.get("rule_ids") or []), at=datetime.fromisoformat(e["at"])))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out[-limit:]


@dataclass
class Change:
    decision: RecordedDecision
    new_decision: str
    new_rules: list[str]
    reason: str


async def simulate(nc: NATS, draft: CedarPolicy, workflows: dict[tuple[str, str], Workflow],
                   limit: int = 500) -> tuple[int, list[Change]]:
    """Re-decide recent jobs with a draft bundle; return (jobs checked, decisions that would change)."""
    decisions = await recent_decisions(nc, limit)
    changes = []
    for d in decisions:
        workflow = workflows.get((d.workflow_id, d.workflow_version))
        if workflow is None:
            continue
        request = request_for(workflow, d.step_id, tenant=d.tenant, job_input=d.input, job_hash=d.job_hash,
                              now=d.at, topic=d.topic, step_type=d.step_type)
        outcome = draft.decide(request)
        if outcome.decision != d.decision:
            changes.append(Change(d, outcome.decision, outcome.rule_ids, outcome.reason))
    return len(decisions), changes
