"""The policy request for one step of a workflow: the services and the tools build it alike."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from interlock.core.policy.engine import JobRequest
from interlock.core.steps import base_step_id
from interlock.core.workflow import Workflow


def request_for(workflow: Workflow, step_id: str, *, tenant: str, job_input: Any, job_hash: str = "",
                now: datetime | None = None, topic: str | None = None, step_type: str | None = None,
                capabilities: tuple[str, ...] = (), agent_version: str = "") -> JobRequest:
    """The policy request for run step ``step_id`` (a for_each item or compensation job is
    asked about with its workflow step's labels and approval settings)."""
    spec = workflow.steps[base_step_id(step_id)]
    return JobRequest(
        tenant=tenant, workflow_id=workflow.id, workflow_version=workflow.version, step_id=step_id,
        step_type=step_type or spec.type.value, topic=topic if topic is not None else spec.topic,
        labels=dict(spec.labels), input=job_input, job_hash=job_hash, require_approval=spec.require_approval,
        approvers=spec.approvers, now=now or datetime.now(UTC), capabilities=capabilities,
        agent_version=agent_version,
    )
