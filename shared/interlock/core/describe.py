"""One-line human descriptions of stored events, for timelines and live progress."""

from __future__ import annotations

from typing import Any


def _short(value: Any, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(envelope: dict[str, Any]) -> str:
    """``envelope`` is a stored event (type, data, …); unknown types are described as such."""
    kind = envelope.get("type", "?")
    d: dict[str, Any] = envelope.get("data") or {}
    step = d.get("step_id")
    match kind:
        case "RunStarted":
            return f"run started: {d.get('workflow_id')} v{d.get('workflow_version')} (key {d.get('idempotency_key')})"
        case "StepReady":
            extra = f" (compensates {d['compensation_of']})" if d.get("compensation_of") else ""
            return f"{step} ready{extra}, job hash {str(d.get('job_hash', ''))[:12]}"
        case "StepExpanded":
            return f"{step} fans out into {d.get('count')} items"
        case "PolicyDecided":
            rules = ", ".join(d.get("rule_ids") or []) or "-"
            reason = f": {d['reason']}" if d.get("reason") else ""
            return f"policy {d.get('decision')} for {step} (rules {rules}; snapshot {d.get('snapshot_id')}){reason}"
        case "ApprovalRequested":
            return (f"approval of {step} requested from role {d.get('approver_role')} "
                    f"(job hash {str(d.get('job_hash', ''))[:12]}, snapshot {d.get('snapshot_id')})")
        case "ApprovalGranted":
            return f"{step} approved by {d.get('approver')} ({d.get('role')}): {d.get('reason') or 'no reason'}"
        case "ApprovalRejected":
            return f"{step} rejected by {d.get('approver')} ({d.get('role')}): {d.get('reason') or 'no reason'}"
        case "ApprovalExpired":
            return f"approval of {step} expired"
        case "StepDispatched":
            return f"{step} dispatched, attempt {d.get('attempt')} on {d.get('topic')}"
        case "StepHeartbeat":
            progress = f": {d['progress']}" if d.get("progress") else ""
            return f"{step} attempt {d.get('attempt')} alive ({d.get('worker')}){progress}"
        case "StepSucceeded":
            return f"{step} succeeded (attempt {d.get('attempt')}): {_short(d.get('output'))}"
        case "StepFailed":
            err = d.get("error") or {}
            tail = "final" if d.get("final") else "will retry"
            return f"{step} failed (attempt {d.get('attempt')}, {tail}): {_short(err.get('message'))}"
        case "RetryScheduled":
            return f"{step} attempt {d.get('attempt')} scheduled in {d.get('delay_ms')} ms"
        case "StepTimedOut":
            return f"{step} attempt {d.get('attempt')} timed out ({d.get('reason')})"
        case "StepSkipped":
            return f"{step} skipped: {d.get('reason')}"
        case "LateResultRecorded":
            return f"late result for {step} attempt {d.get('attempt')} kept, changes nothing"
        case "CompensationStarted":
            return f"compensating after {d.get('failed_step')}: {', '.join(d.get('steps') or [])}"
        case "CompensationFinished":
            failed = ", ".join(d.get("failed_steps") or [])
            return "compensation finished" + ("" if d.get("ok") else f", failed: {failed}")
        case "RunAdmitted":
            rules = ", ".join(d.get("rule_ids") or []) or "-"
            return f"run admitted by policy (rules {rules}; snapshot {d.get('snapshot_id')})"
        case "ApprovalInvalidated":
            return f"approval request for {step} invalidated: {d.get('reason')}"
        case "ApprovalEscalated":
            return f"approval of {step} escalated from {d.get('from_role')} to {d.get('to_role')}"
        case "RunSucceeded":
            return "run succeeded"
        case "RunFailed":
            return f"run failed: {d.get('reason')}"
        case "RunDenied":
            return f"run denied at {d.get('step_id')}: {d.get('reason')} (rules {', '.join(d.get('rule_ids') or [])})"
        case "RunCancelled":
            return f"run cancelled by {d.get('by') or '?'}: {d.get('reason') or 'no reason'}"
        case "RunTimedOut":
            return f"run timed out after {d.get('timeout_ms')} ms"
    return f"unknown event type {kind}"
