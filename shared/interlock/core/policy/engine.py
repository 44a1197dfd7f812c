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
    escalate_after_ms: int | None = None
    escalate_to_role: str | None = None
    constraints: dict[str, Any] = field(default_factory=dict)


class PolicyEngine(Protocol):
    snapshot_id: str

    def decide(self, request: JobRequest) -> PolicyOutcome: ...
