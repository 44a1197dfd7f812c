"""A ready step's policy decision as a run event, and what recording it does to the run (pure).

The policy service builds every PolicyDecided with :func:`decide_step`, whether it answers the
planner's request (the decision then lands in the planner's commit, with the StepReady) or
decides from its consumer; :func:`record_decision` records one on a run the same way in both.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from interlock.contracts import events as ev
from interlock.core.codec import job_hash
from interlock.core.policy.engine import PolicyEngine
from interlock.core.policy.requests import request_for
from interlock.core.run import Run
from interlock.core.workflow import Workflow


def decide_step(engine: PolicyEngine, workflow: Workflow, *, tenant: str, step_id: str, step_type: str,
                topic: str | None, job_input: Any, job_hash: str, now: datetime,
                capabilities: tuple[str, ...] = (), agent_version: str = "") -> ev.PolicyDecided:
    """The decision of ``engine`` on one ready step, as the event that records it."""
    outcome = engine.decide(request_for(
        workflow, step_id, tenant=tenant, job_input=job_input, job_hash=job_hash, now=now, topic=topic,
        step_type=step_type, capabilities=capabilities, agent_version=agent_version))
    return ev.PolicyDecided(
        step_id=step_id, decision=outcome.decision, step_type=step_type,
        snapshot_id=outcome.snapshot_id, rule_ids=outcome.rule_ids, job_hash=job_hash, reason=outcome.reason,
        approver_role=outcome.approver_role, approval_expires_ms=outcome.approval_expires_ms,
        escalate_after_ms=outcome.escalate_after_ms, escalate_to_role=outcome.escalate_to_role,
        constraints=outcome.constraints,
    )


def hash_problem(workflow: Workflow, *, step_id: str, topic: str | None, job_input: Any, claimed: str) -> str | None:
    """Why a step's claimed job hash is not the hash of the job it describes, or None (a decision
    is bound to the job hash: it must be the hash of the input it was made on)."""
    actual = job_hash(workflow_id=workflow.id, workflow_version=workflow.version, step_id=step_id, topic=topic,
                      input=job_input)
    if actual == claimed:
        return None
    return f"step {step_id}: job hash {claimed[:12]}… is not the hash of its input ({actual[:12]}…)"


def record_decision(run: Run, decided: ev.PolicyDecided) -> None:
    """Record ``decided`` on ``run``; a deny also ends the run (DENIED)."""
    run.decide_policy(decided)
    if decided.decision == "deny":
        run.deny(ev.RunDenied(step_id=decided.step_id, reason=decided.reason or "denied by policy",
                              rule_ids=decided.rule_ids, snapshot_id=decided.snapshot_id))


__all__ = ["decide_step", "hash_problem", "record_decision"]
