"""Timeline text: a short human summary of each run event, for the auditor, the CLI and the client.

Pure functions of an event's type name and its raw ``data`` dict. They never raise on odd data
(a log may hold data that does not fit its contract, or a type this version does not know): a
missing or mistyped field reads as a placeholder. The field readers are public because the
auditor's projection reads raw data the same lenient way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeGuard

from interlock.contracts import events as ev

UNKNOWN_TYPE_SUMMARY = "unknown event type"

Describer = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]


# -- lenient field readers ---------------------------------------------------------------------
def short_hash(value: Any, length: int = 6) -> str:
    """The first ``length`` characters of a hash, marked with an ellipsis when cut."""
    text = str(value or "")
    return text[:length] + "…" if len(text) > length else text


def str_field(data: dict[str, Any], key: str, default: str = "") -> str:
    """``data[key]`` as text, ``default`` when missing or null."""
    value = data.get(key)
    return default if value is None else str(value)


def opt_field(data: dict[str, Any], key: str) -> str | None:
    """``data[key]`` as text, None when missing or null."""
    value = data.get(key)
    return None if value is None else str(value)


_INT64_MAX = 2**63 - 1


def is_int64(value: Any) -> TypeGuard[int]:
    """A signed 64-bit int, what SQLite can store (a bool is not an int here)."""
    return isinstance(value, int) and not isinstance(value, bool) and -_INT64_MAX <= value <= _INT64_MAX


def int_field(data: dict[str, Any], key: str, default: int = 0) -> int:
    """``data[key]`` when it is a 64-bit int, else ``default``."""
    value = data.get(key)
    return value if is_int64(value) else default


def rule_ids(data: dict[str, Any]) -> list[str]:
    """The ``rule_ids`` list as text, empty when it is not a list."""
    value = data.get("rule_ids")
    return [str(r) for r in value] if isinstance(value, list) else []


def error_message(data: dict[str, Any]) -> str:
    """The message of the ``error`` field (a JobError object, or anything else as text)."""
    error = data.get("error")
    if isinstance(error, dict):
        return str_field(error, "message", "error")
    return "" if error is None else str(error)


# -- summaries ---------------------------------------------------------------------------------
def describe(type_name: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A short human summary of one event and the details an auditor wants next to it."""
    describer = _DESCRIBE.get(type_name)
    if describer is None:
        return UNKNOWN_TYPE_SUMMARY, {}
    return describer(data)


def _d_run_started(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    text = f"run started: {str_field(d, 'workflow_id', '?')} v{str_field(d, 'workflow_version', '?')}"
    if d.get("requested_by"):
        text += f" by {d['requested_by']}"
    if d.get("rerun_of"):
        text += f", re-run of {d['rerun_of']}"
    return text, {"definition_hash": d.get("definition_hash"), "idempotency_key": d.get("idempotency_key")}


def _d_run_succeeded(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "run succeeded", {}


def _d_run_failed(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    text = f"run failed: {str_field(d, 'reason', 'no reason given')}"
    if d.get("compensated"):
        text += " (compensated)"
    return text, {}


def _d_run_denied(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    rules = rule_ids(d)
    text = f"run denied: {str_field(d, 'reason', 'no reason given')}"
    if rules or d.get("snapshot_id"):
        text += f" (rules {', '.join(rules) or 'none'}, snapshot {str_field(d, 'snapshot_id', '?')})"
    return text, {"rule_ids": rules, "snapshot_id": d.get("snapshot_id")}


def _d_run_cancelled(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    text = "run cancelled"
    if d.get("by"):
        text += f" by {d['by']}"
    if d.get("reason"):
        text += f": {d['reason']}"
    return text, {}


def _d_run_timed_out(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return f"run timed out after {int_field(d, 'timeout_ms')} ms", {}


def _d_step_ready(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    step_type = str_field(d, "step_type", "job")
    text = f"ready: {step_type} step"
    if d.get("topic"):
        text += f" on topic {d['topic']}"
    text += f" (hash {short_hash(d.get('job_hash'))})"
    if d.get("compensation_of"):
        text += f", compensates {d['compensation_of']}"
    return text, {"step_type": step_type, "topic": d.get("topic"), "job_hash": d.get("job_hash")}


def _d_step_expanded(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return f"expanded into {int_field(d, 'count')} items", {"count": int_field(d, "count")}


def _d_policy(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    rules = rule_ids(d)
    text = (f"policy {str_field(d, 'decision', '?')} (rules {', '.join(rules) or 'none'}, "
            f"snapshot {str_field(d, 'snapshot_id', '?')})")
    if d.get("reason"):
        text += f": {d['reason']}"
    details = {"decision": d.get("decision"), "snapshot_id": d.get("snapshot_id"), "rule_ids": rules,
               "job_hash": d.get("job_hash")}
    if d.get("approver_role"):
        details["approver_role"] = d.get("approver_role")
    if d.get("reason"):
        details["reason"] = d.get("reason")
    return text, details


def _d_approval_requested(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    text = f"approval requested from role {str_field(d, 'approver_role', '?')} (hash {short_hash(d.get('job_hash'))})"
    return text, {"job_hash": d.get("job_hash"), "snapshot_id": d.get("snapshot_id"),
                  "approver_role": d.get("approver_role"), "expires_at": d.get("expires_at")}


def _decided(verb: str) -> Describer:
    def summary(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        text = f"{verb} by {str_field(d, 'approver', '?')} ({str_field(d, 'role', '?')})"
        if d.get("via"):
            text += f" via {d['via']}"
        if d.get("reason"):
            text += f": {d['reason']}"
        details = {"job_hash": d.get("job_hash"), "approver": d.get("approver"), "role": d.get("role")}
        if d.get("via"):
            details["via"] = d.get("via")
        return text, details
    return summary


def _d_approval_expired(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return f"approval expired (hash {short_hash(d.get('job_hash'))})", {"job_hash": d.get("job_hash")}


def _d_approval_refused(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    what = "rejection" if d.get("decision") == "reject" else "approval"
    text = (f"{what} by {str_field(d, 'principal', '?')} refused: {str_field(d, 'reason')} "
            f"(hash {short_hash(d.get('job_hash'))}); the request stays pending")
    return text, {"principal": d.get("principal"), "role": d.get("role"), "job_hash": d.get("job_hash"),
                  "required_role": d.get("required_role")}


def _d_run_admitted(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return (f"run admitted (rules {', '.join(rule_ids(d)) or '-'}, snapshot {str_field(d, 'snapshot_id', '?')})",
            {"snapshot_id": d.get("snapshot_id"), "rule_ids": rule_ids(d)})


def _d_approval_invalidated(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return (f"approval request invalidated: {str_field(d, 'reason')} (hash {short_hash(d.get('job_hash'))})",
            {"job_hash": d.get("job_hash"), "snapshot_id": d.get("snapshot_id")})


def _d_approval_escalated(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return (f"approval escalated from {str_field(d, 'from_role')} to {str_field(d, 'to_role')}",
            {"job_hash": d.get("job_hash"), "to_role": d.get("to_role")})


def _d_dispatched(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    text = f"dispatched attempt {int_field(d, 'attempt')} (job {str_field(d, 'job_id', '?')})"
    details: dict[str, Any] = {"job_id": d.get("job_id"), "topic": d.get("topic"), "deadline": d.get("deadline")}
    if d.get("agent_version"):
        text += f" to agent version {str_field(d, 'agent_version')}"
        if d.get("route"):
            text += f" ({str_field(d, 'route')})"
        details.update(agent_version=d.get("agent_version"), route=d.get("route"))
    return text, details


def _d_held(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    reason = str_field(d, "reason", "?")
    text = f"attempt {int_field(d, 'attempt')} held: {reason.replace('_', ' ')}"
    if d.get("message"):
        text += f" ({str_field(d, 'message')})"
    return text, {"topic": d.get("topic"), "reason": reason, "until": d.get("until")}


def _d_throttled(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    text = f"throttled, attempt {int_field(d, 'attempt')} waits: {str_field(d, 'reason') or str_field(d, 'scope', '?')}"
    return text, {"scope": d.get("scope"), "priority": d.get("priority")}


def _d_heartbeat(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    text = f"heartbeat, attempt {int_field(d, 'attempt')}"
    if d.get("worker"):
        text += f" from {d['worker']}"
    if d.get("progress"):
        text += f": {d['progress']}"
    return text, {"worker": d.get("worker")}


def usage_summary(d: dict[str, Any]) -> dict[str, Any] | None:
    """Totals of an outcome's ``usage`` (model calls), read leniently; None when there is none."""
    calls = [c for c in d.get("usage") or [] if isinstance(c, dict)] if isinstance(d.get("usage"), list) else []
    if not calls:
        return None

    def number(call: dict[str, Any], key: str) -> float:
        value = call.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

    models = sorted({str(c.get("model")) for c in calls if c.get("model")})
    return {"calls": len(calls), "models": models,
            "input_tokens": int(sum(number(c, "input_tokens") for c in calls)),
            "output_tokens": int(sum(number(c, "output_tokens") for c in calls)),
            "cost_usd": round(sum(number(c, "cost_usd") for c in calls), 6)}


def _with_usage(text: str, details: dict[str, Any], d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    usage = usage_summary(d)
    if usage is None:
        return text, details
    text += (f"; {', '.join(usage['models']) or 'model'}: {usage['input_tokens']}+{usage['output_tokens']} tokens, "
             f"${usage['cost_usd']:.4f}")
    return text, {**details, "usage": usage}


def _d_succeeded(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    attempt = int_field(d, "attempt")
    text = f"succeeded attempt {attempt}" if attempt else "succeeded"
    if d.get("worker"):
        text += f" ({d['worker']})"
    details: dict[str, Any] = {"worker": d.get("worker")}
    if d.get("output_ref") is not None:
        details["output_ref"] = d.get("output_ref")
    return _with_usage(text, details, d)


def _d_failed(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    attempt = int_field(d, "attempt")
    head = f"failed attempt {attempt}" if attempt else "failed"
    text = f"{head}: {error_message(d) or 'no message'} ({'final' if d.get('final') else 'retry'})"
    return _with_usage(text, {"error": d.get("error"), "final": bool(d.get("final")), "worker": d.get("worker")}, d)


def _d_budget(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    limit = str_field(d, "limit", "?")
    return (f"budget exceeded: spent {d.get('spent')} over {limit} {d.get('allowed')}",
            {"limit": limit, "allowed": d.get("allowed"), "spent": d.get("spent")})


def _d_retry(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return (f"retry {int_field(d, 'attempt')} scheduled in {int_field(d, 'delay_ms')} ms",
            {"due_at": d.get("due_at"), "delay_ms": d.get("delay_ms")})


def _d_timed_out(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return f"attempt {int_field(d, 'attempt')} timed out ({str_field(d, 'reason', 'deadline')})", {}


def _d_skipped(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return f"skipped: {str_field(d, 'reason', 'no reason given')}", {}


def _d_cache_hit(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    source = f"run {str_field(d, 'source_run_id', '?')} step {str_field(d, 'source_step_id', '?')}"
    return (f"cache hit: output of {source} reused, no job dispatched",
            {"source_run_id": d.get("source_run_id"), "source_step_id": d.get("source_step_id"),
             "cache_key": d.get("cache_key")})


def _d_late(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    outcome = "ok" if d.get("ok") else "failed"
    text = f"late result for attempt {int_field(d, 'attempt')} ({outcome}) recorded, changes nothing"
    return text, {"worker": d.get("worker"), "ok": bool(d.get("ok"))}


def _d_comp_started(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    steps = [str(x) for x in d.get("steps") or []] if isinstance(d.get("steps"), list) else []
    return (f"compensation started after {str_field(d, 'failed_step', '?')} failed: {', '.join(steps) or 'nothing'}",
            {"steps": steps})


def _d_comp_finished(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    failed = d.get("failed_steps") if isinstance(d.get("failed_steps"), list) else []
    if d.get("ok"):
        return "compensation finished ok", {}
    return f"compensation finished with failures: {', '.join(map(str, failed or [])) or '?'}", {}


# -- a person's interventions and feedback (issue 17) ------------------------------------------
def _by(d: dict[str, Any]) -> str:
    """' by alice (via api:k1): why' for an intervention's event."""
    text = f" by {str_field(d, 'by', '?')}"
    if d.get("via"):
        text += f" (via {d['via']})"
    if d.get("reason"):
        text += f": {d['reason']}"
    return text


def _d_run_resumed(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    steps = [str(x) for x in d.get("steps") or []] if isinstance(d.get("steps"), list) else []
    return f"run resumed from {', '.join(steps) or '?'}{_by(d)}", {"by": d.get("by"), "steps": steps}


def _d_retry_requested(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    patched = bool(d.get("patched"))
    text = f"retry{' with a new input' if patched else ''} (hash {short_hash(d.get('job_hash'))}){_by(d)}"
    return text, {"by": d.get("by"), "patched": patched, "job_hash": d.get("job_hash")}


def _d_output_supplied(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    text = f"skipped with a supplied output (hash {short_hash(d.get('output_hash'))}){_by(d)}"
    return text, {"by": d.get("by"), "output_hash": d.get("output_hash")}


def _d_paused(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return f"dispatching paused{_by(d)}", {"by": d.get("by")}


def _d_unpaused(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return f"dispatching unpaused{_by(d)}", {"by": d.get("by")}


def _d_feedback(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    parts = [f"score {d['score']}"] if d.get("score") is not None else []
    parts += ["a correction"] if d.get("correction") is not None else []
    parts += [f"note {d['note']!r}"] if d.get("note") else []
    text = (f"feedback on output {short_hash(d.get('output_hash'))} by {str_field(d, 'by', '?')}: "
            f"{', '.join(parts) or 'nothing'}")
    return text, {"by": d.get("by"), "score": d.get("score"), "output_hash": d.get("output_hash")}


def _d_guard(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    findings = d.get("findings") if isinstance(d.get("findings"), list) else []
    kinds = sorted({str(f.get("kind")) for f in findings or [] if isinstance(f, dict)})
    check, verdict, action = str_field(d, "check", "?"), str_field(d, "verdict", "?"), str_field(d, "action", "none")
    text = f"guard {check}: {verdict}" + (f" ({', '.join(kinds)})" if kinds else "")
    if action != "none":
        text += {"fail": ", the step fails", "approve": ", held for approval", "redact": ", redacted"}.get(action, "")
    return text, {"check": check, "verdict": verdict, "action": action, "findings": findings}


_DESCRIBE: dict[str, Describer] = ev.complete_table("timeline descriptions", {
    ev.RunStarted: _d_run_started,
    ev.RunSucceeded: _d_run_succeeded,
    ev.RunFailed: _d_run_failed,
    ev.BudgetExceeded: _d_budget,
    ev.RunDenied: _d_run_denied,
    ev.RunCancelled: _d_run_cancelled,
    ev.RunTimedOut: _d_run_timed_out,
    ev.StepReady: _d_step_ready,
    ev.StepExpanded: _d_step_expanded,
    ev.PolicyDecided: _d_policy,
    ev.ApprovalRequested: _d_approval_requested,
    ev.ApprovalGranted: _decided("approved"),
    ev.ApprovalRejected: _decided("rejected"),
    ev.ApprovalExpired: _d_approval_expired,
    ev.ApprovalRefused: _d_approval_refused,
    ev.ApprovalInvalidated: _d_approval_invalidated,
    ev.ApprovalEscalated: _d_approval_escalated,
    ev.RunAdmitted: _d_run_admitted,
    ev.StepDispatched: _d_dispatched,
    ev.StepThrottled: _d_throttled,
    ev.StepHeartbeat: _d_heartbeat,
    ev.StepHeld: _d_held,
    ev.StepSucceeded: _d_succeeded,
    ev.StepFailed: _d_failed,
    ev.RetryScheduled: _d_retry,
    ev.StepTimedOut: _d_timed_out,
    ev.StepSkipped: _d_skipped,
    ev.StepCacheHit: _d_cache_hit,
    ev.LateResultRecorded: _d_late,
    ev.CompensationStarted: _d_comp_started,
    ev.CompensationFinished: _d_comp_finished,
    ev.RunResumed: _d_run_resumed,
    ev.StepRetryRequested: _d_retry_requested,
    ev.StepOutputSupplied: _d_output_supplied,
    ev.RunPaused: _d_paused,
    ev.RunUnpaused: _d_unpaused,
    ev.FeedbackGiven: _d_feedback,
    ev.GuardChecked: _d_guard,
})


__all__ = [
    "UNKNOWN_TYPE_SUMMARY",
    "Describer",
    "describe",
    "error_message",
    "int_field",
    "is_int64",
    "opt_field",
    "rule_ids",
    "short_hash",
    "str_field",
]
