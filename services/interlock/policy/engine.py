"""Policy engines: given a job about to run, allow, deny or require approval.

The engine sees the job as the policy language will: tenant, workflow, step, topic, labels,
the resolved input and the time. Every decision names the snapshot it came from and the
rules that decided, so the log shows why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

Decision = Literal["allow", "deny", "require_approval"]


@dataclass(frozen=True)
class JobRequest:
    tenant: str
    workflow_id: str
    workflow_version: str
    step_id: str
    step_type: str
    topic: str | None
    labels: dict[str, str]
    input: Any
    job_hash: str
    require_approval: bool
    approvers: str
    now: datetime
    kind: Literal["job", "run"] = "job"
    capabilities: tuple[str, ...] = ()  # offered by the agents registered for the topic
    agent_version: str = ""


@dataclass(frozen=True)
class PolicyOutcome:
    decision: Decision
    snapshot_id: str
    rule_ids: list[str]
    reason: str = ""
    approver_role: str | None = None
    approval_expires_ms: int | None = None
    constraints: dict[str, Any] = field(default_factory=dict)


class PolicyEngine(Protocol):
    snapshot_id: str

    def decide(self, request: JobRequest) -> PolicyOutcome: ...


class BuiltinPolicy:
    """Allow everything, except what the workflow itself marks for approval.

    A step with ``require_approval: true`` or label ``risk: high`` needs its approvers' decision.
    """

    snapshot_id = "builtin@1"

    def decide(self, request: JobRequest) -> PolicyOutcome:
        if request.step_type == "job" and (request.require_approval or request.labels.get("risk") == "high"):
            rule = "builtin.require_approval" if request.require_approval else "builtin.high_risk"
            return PolicyOutcome("require_approval", self.snapshot_id, [rule],
                                 reason="the workflow marks this step for approval",
                                 approver_role=request.approvers)
        return PolicyOutcome("allow", self.snapshot_id, ["builtin.allow"])
