"""How each event type changes the projection's rows (runs, steps, attempts, decisions, approvals).

Handlers read the event's raw data leniently (it may not fit its contract) and run on the
SQLite thread inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from interlock.auditor.projection._schema import dumps
from interlock.contracts import events as ev
from interlock.core.timeline import error_message, int_field, is_int64, opt_field, rule_ids, str_field, usage_summary

TERMINAL_STEP = ("succeeded", "failed", "skipped", "denied", "cancelled")


class RowEvent:
    """One envelope being projected: its fields read leniently."""

    __slots__ = ("at", "attempt", "data", "run_id", "seq", "step_id", "type")

    def __init__(self, run_id: str, seq: int, envelope: dict[str, Any]) -> None:
        self.run_id = run_id
        self.seq = seq
        self.type = str_field(envelope, "type", "?")
        self.at = opt_field(envelope, "at")
        raw = envelope.get("data")
        self.data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        step = envelope.get("step_id")
        step = step if step is not None else self.data.get("step_id")
        self.step_id = None if step is None else str(step)
        attempt = envelope.get("attempt")
        attempt = attempt if attempt is not None else self.data.get("attempt")
        self.attempt = attempt if is_int64(attempt) else None


RowHandler = Callable[[sqlite3.Connection, RowEvent], None]


def _ensure_step(conn: sqlite3.Connection, e: RowEvent) -> str:
    step_id = e.step_id or "?"
    conn.execute("INSERT OR IGNORE INTO steps (run_id, step_id, first_seq, status, started_at) "
                 "VALUES (?, ?, ?, 'unknown', ?)", (e.run_id, step_id, e.seq, e.at))
    return step_id


def _set_step(conn: sqlite3.Connection, e: RowEvent, **columns: Any) -> None:
    step_id = _ensure_step(conn, e)
    names = ", ".join(f"{name} = ?" for name in columns)
    conn.execute(f"UPDATE steps SET {names} WHERE run_id = ? AND step_id = ?",
                 (*columns.values(), e.run_id, step_id))


def _h_run_started(conn: sqlite3.Connection, e: RowEvent) -> None:
    if e.seq != 1:
        return  # a second RunStarted is flagged as a chain problem; it changes nothing
    d = e.data
    conn.execute(
        "UPDATE runs SET workflow_id = ?, workflow_version = ?, definition_hash = ?, status = 'running', "
        "idempotency_key = ?, requested_by = ?, rerun_of = ?, started_at = ? WHERE run_id = ?",
        (opt_field(d, "workflow_id"), opt_field(d, "workflow_version"), opt_field(d, "definition_hash"),
         opt_field(d, "idempotency_key"), str_field(d, "requested_by"), opt_field(d, "rerun_of"), e.at, e.run_id))


def _end_run(status: str, reason: Callable[[dict[str, Any]], str]) -> RowHandler:
    def handler(conn: sqlite3.Connection, e: RowEvent) -> None:
        conn.execute("UPDATE runs SET status = ?, reason = ?, ended_at = ? WHERE run_id = ?",
                     (status, reason(e.data), e.at, e.run_id))
        if status == "cancelled":
            placeholders = ", ".join("?" * len(TERMINAL_STEP))
            conn.execute(f"UPDATE steps SET status = 'cancelled', ended_at = ? WHERE run_id = ? "
                         f"AND status NOT IN ({placeholders})", (e.at, e.run_id, *TERMINAL_STEP))
    return handler


def _h_comp_started(conn: sqlite3.Connection, e: RowEvent) -> None:
    conn.execute("UPDATE runs SET status = 'compensating' WHERE run_id = ?", (e.run_id,))


def _h_nothing(conn: sqlite3.Connection, e: RowEvent) -> None:
    """Evidence only (LateResultRecorded, ApprovalRefused, CompensationFinished): the timeline row is the record."""


def _h_step_ready(conn: sqlite3.Connection, e: RowEvent) -> None:
    d = e.data
    conn.execute(
        "INSERT INTO steps (run_id, step_id, first_seq, status, step_type, topic, parent_id, compensation_of, "
        "job_hash, started_at) VALUES (?, ?, ?, 'ready', ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (run_id, step_id) DO UPDATE SET status = 'ready', step_type = excluded.step_type, "
        "topic = excluded.topic, parent_id = excluded.parent_id, compensation_of = excluded.compensation_of, "
        "job_hash = excluded.job_hash",
        (e.run_id, e.step_id or "?", e.seq, str_field(d, "step_type", "job"), opt_field(d, "topic"),
         opt_field(d, "parent_id"), opt_field(d, "compensation_of"), opt_field(d, "job_hash"), e.at))


def _h_step_expanded(conn: sqlite3.Connection, e: RowEvent) -> None:
    _set_step(conn, e, status="expanded", item_count=int_field(e.data, "count"))


def _h_policy(conn: sqlite3.Connection, e: RowEvent) -> None:
    d = e.data
    step_id = _ensure_step(conn, e)
    rules = dumps(rule_ids(d))
    decision = opt_field(d, "decision")
    conn.execute(
        "INSERT OR REPLACE INTO decisions (run_id, step_id, seq, at, decision, snapshot_id, rule_ids, job_hash, "
        "reason, approver_role) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (e.run_id, step_id, e.seq, e.at, decision, opt_field(d, "snapshot_id"), rules, opt_field(d, "job_hash"),
         str_field(d, "reason"), opt_field(d, "approver_role")))
    conn.execute(
        "UPDATE steps SET decision = ?, snapshot_id = ?, rule_ids = ?, "
        "status = CASE WHEN ? = 'deny' THEN 'denied' "
        "WHEN ? = 'require_approval' OR step_type = 'approval' THEN 'awaiting_approval' ELSE 'released' END, "
        "ended_at = CASE WHEN ? = 'deny' THEN ? ELSE ended_at END WHERE run_id = ? AND step_id = ?",
        (decision, opt_field(d, "snapshot_id"), rules, decision, decision, decision, e.at, e.run_id, step_id))


def _h_approval_requested(conn: sqlite3.Connection, e: RowEvent) -> None:
    d = e.data
    step_id = _ensure_step(conn, e)
    conn.execute(
        "INSERT OR REPLACE INTO approvals (run_id, step_id, seq, status, job_hash, snapshot_id, approver_role, "
        "prompt, requested_at, expires_at) VALUES (?, ?, ?, 'requested', ?, ?, ?, ?, ?, ?)",
        (e.run_id, step_id, e.seq, opt_field(d, "job_hash"), opt_field(d, "snapshot_id"), opt_field(d, "approver_role"),
         str_field(d, "prompt"), e.at, opt_field(d, "expires_at")))
    _set_step(conn, e, status="awaiting_approval", approval_status="requested", approver=None)


def _approval_outcome(status: str) -> RowHandler:
    def handler(conn: sqlite3.Connection, e: RowEvent) -> None:
        d = e.data
        step_id = _ensure_step(conn, e)
        conn.execute(
            "UPDATE approvals SET status = ?, approver = ?, reason = ?, decided_at = ? WHERE run_id = ? AND seq = "
            "(SELECT MAX(seq) FROM approvals WHERE run_id = ? AND step_id = ? AND status = 'requested')",
            (status, opt_field(d, "approver"), str_field(d, "reason"), e.at, e.run_id, e.run_id, step_id))
        columns: dict[str, Any] = {"approval_status": status}
        if status != "expired":
            columns["approver"] = opt_field(d, "approver")
        if status == "granted":
            columns["status"] = "released"
        _set_step(conn, e, **columns)
    return handler


def _h_approval_invalidated(conn: sqlite3.Connection, e: RowEvent) -> None:
    _approval_outcome("invalidated")(conn, e)
    _set_step(conn, e, status="ready", decision=None)


def _h_approval_escalated(conn: sqlite3.Connection, e: RowEvent) -> None:
    step_id = _ensure_step(conn, e)
    conn.execute(
        "UPDATE approvals SET approver_role = ? WHERE run_id = ? AND seq = "
        "(SELECT MAX(seq) FROM approvals WHERE run_id = ? AND step_id = ? AND status = 'requested')",
        (opt_field(e.data, "to_role"), e.run_id, e.run_id, step_id))


def _h_dispatched(conn: sqlite3.Connection, e: RowEvent) -> None:
    d = e.data
    step_id = _ensure_step(conn, e)
    attempt = int_field(d, "attempt")
    conn.execute(
        "INSERT INTO attempts (run_id, step_id, attempt, job_id, topic, dispatched_at, outcome) "
        "VALUES (?, ?, ?, ?, ?, ?, 'dispatched') ON CONFLICT (run_id, step_id, attempt) DO UPDATE SET "
        "job_id = excluded.job_id, topic = excluded.topic, dispatched_at = excluded.dispatched_at, "
        "outcome = 'dispatched', ended_at = NULL",
        (e.run_id, step_id, attempt, opt_field(d, "job_id"), opt_field(d, "topic"), e.at))
    conn.execute("UPDATE steps SET status = 'dispatched', attempt = ?, topic = COALESCE(?, topic) "
                 "WHERE run_id = ? AND step_id = ?", (attempt, opt_field(d, "topic"), e.run_id, step_id))


def _h_heartbeat(conn: sqlite3.Connection, e: RowEvent) -> None:
    step_id = _ensure_step(conn, e)
    conn.execute("UPDATE attempts SET outcome = CASE WHEN outcome = 'dispatched' THEN 'running' ELSE outcome END, "
                 "worker = COALESCE(NULLIF(?, ''), worker) WHERE run_id = ? AND step_id = ? AND attempt = ?",
                 (str_field(e.data, "worker"), e.run_id, step_id, int_field(e.data, "attempt")))
    conn.execute("UPDATE steps SET status = 'running' WHERE run_id = ? AND step_id = ? "
                 "AND status IN ('dispatched', 'running')", (e.run_id, step_id))


def _record_usage(conn: sqlite3.Connection, e: RowEvent, step_id: str) -> None:
    """An outcome's model calls, one row per outcome event (summed by the cost queries)."""
    usage = usage_summary(e.data)
    if usage is None:
        return
    conn.execute("INSERT OR REPLACE INTO usage (run_id, seq, step_id, attempt, at, calls, models, input_tokens, "
                 "output_tokens, cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (e.run_id, e.seq, step_id, e.attempt, e.at, usage["calls"], dumps(usage["models"]),
                  usage["input_tokens"], usage["output_tokens"], usage["cost_usd"]))


def _h_succeeded(conn: sqlite3.Connection, e: RowEvent) -> None:
    d = e.data
    step_id = _ensure_step(conn, e)
    _record_usage(conn, e, step_id)
    attempt = int_field(d, "attempt")
    if attempt:
        conn.execute("UPDATE attempts SET outcome = 'succeeded', ended_at = ?, worker = COALESCE(NULLIF(?, ''), "
                     "worker) WHERE run_id = ? AND step_id = ? AND attempt = ?",
                     (e.at, str_field(d, "worker"), e.run_id, step_id, attempt))
    _set_step(conn, e, status="succeeded", output=dumps(d.get("output")), output_ref=dumps(d.get("output_ref")),
              error=None, ended_at=e.at)


def _h_failed(conn: sqlite3.Connection, e: RowEvent) -> None:
    d = e.data
    step_id = _ensure_step(conn, e)
    _record_usage(conn, e, step_id)
    attempt = int_field(d, "attempt")
    message = error_message(d)
    if attempt:
        conn.execute(
            "UPDATE attempts SET outcome = CASE WHEN outcome IN ('dispatched', 'running') OR outcome IS NULL "
            "THEN 'failed' ELSE outcome END, error = ?, ended_at = COALESCE(ended_at, ?), "
            "worker = COALESCE(NULLIF(?, ''), worker) WHERE run_id = ? AND step_id = ? AND attempt = ?",
            (message, e.at, str_field(d, "worker"), e.run_id, step_id, attempt))
    if d.get("final"):
        _set_step(conn, e, status="failed", error=message, ended_at=e.at)
    else:
        _set_step(conn, e, error=message)


def _h_retry(conn: sqlite3.Connection, e: RowEvent) -> None:
    _set_step(conn, e, status="retry_wait")


def _h_timed_out(conn: sqlite3.Connection, e: RowEvent) -> None:
    step_id = _ensure_step(conn, e)
    conn.execute("UPDATE attempts SET outcome = 'timed_out', ended_at = ?, error = ? "
                 "WHERE run_id = ? AND step_id = ? AND attempt = ?",
                 (e.at, f"timed out ({str_field(e.data, 'reason', 'deadline')})", e.run_id, step_id,
                  int_field(e.data, "attempt")))
    _set_step(conn, e, status="timed_out")


def _h_skipped(conn: sqlite3.Connection, e: RowEvent) -> None:
    _set_step(conn, e, status="skipped", ended_at=e.at)


# -- a person's interventions and feedback (issue 17) ------------------------------------------
def _reopen_parent(conn: sqlite3.Connection, e: RowEvent) -> None:
    """An item retried or completed by hand: its failed for_each parent waits again."""
    conn.execute("UPDATE steps SET status = 'expanded', error = NULL, ended_at = NULL WHERE run_id = ? AND "
                 "status = 'failed' AND step_id = (SELECT parent_id FROM steps WHERE run_id = ? AND step_id = ?)",
                 (e.run_id, e.run_id, e.step_id or "?"))


def _h_run_resumed(conn: sqlite3.Connection, e: RowEvent) -> None:
    conn.execute("UPDATE runs SET status = 'running', reason = NULL, ended_at = NULL WHERE run_id = ?", (e.run_id,))


def _h_retry_requested(conn: sqlite3.Connection, e: RowEvent) -> None:
    _set_step(conn, e, status="ready", job_hash=opt_field(e.data, "job_hash"), decision=None, snapshot_id=None,
              rule_ids=None, approval_status=None, approver=None, error=None, ended_at=None)
    _reopen_parent(conn, e)


def _h_output_supplied(conn: sqlite3.Connection, e: RowEvent) -> None:
    d = e.data
    _set_step(conn, e, status="succeeded", output=dumps(d.get("output")), output_ref=dumps(d.get("output_ref")),
              error=None, ended_at=e.at)
    _reopen_parent(conn, e)


def _h_feedback(conn: sqlite3.Connection, e: RowEvent) -> None:
    d = e.data
    score = d.get("score")
    conn.execute(
        "INSERT OR REPLACE INTO feedback (run_id, seq, step_id, attempt, output_hash, by_principal, via, score, "
        "correction, note, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (e.run_id, e.seq, e.step_id or "?", int_field(d, "attempt"), str_field(d, "output_hash"), str_field(d, "by"),
         opt_field(d, "via"), float(score) if isinstance(score, int | float) else None, dumps(d.get("correction")),
         str_field(d, "note"), e.at))


def _h_guard(conn: sqlite3.Connection, e: RowEvent) -> None:
    # the verdict itself is in the timeline; a held output makes the step wait for a person
    if e.data.get("held"):
        _set_step(conn, e, status="awaiting_approval")
        _record_usage(conn, e, e.step_id or "?")  # the held attempt's model calls


# the rows each event type changes; checked complete against the registry at import
ROW_HANDLERS: dict[str, RowHandler] = ev.complete_table("auditor projection row handlers", {
    ev.RunStarted: _h_run_started,
    ev.RunSucceeded: _end_run("succeeded", lambda d: ""),
    ev.RunFailed: _end_run("failed", lambda d: str_field(d, "reason")),
    ev.RunDenied: _end_run("denied", lambda d: str_field(d, "reason")),
    ev.RunCancelled: _end_run("cancelled", lambda d: str_field(d, "reason")),
    ev.RunTimedOut: _end_run("timed_out", lambda d: f"run exceeded {int_field(d, 'timeout_ms')} ms"),
    ev.StepReady: _h_step_ready,
    ev.StepExpanded: _h_step_expanded,
    ev.PolicyDecided: _h_policy,
    ev.ApprovalRequested: _h_approval_requested,
    ev.ApprovalGranted: _approval_outcome("granted"),
    ev.ApprovalRejected: _approval_outcome("rejected"),
    ev.ApprovalExpired: _approval_outcome("expired"),
    ev.ApprovalInvalidated: _h_approval_invalidated,
    ev.ApprovalEscalated: _h_approval_escalated,
    ev.RunAdmitted: _h_nothing,
    ev.StepDispatched: _h_dispatched,
    ev.StepThrottled: _h_nothing,  # evidence: the step stays released until it is dispatched
    ev.StepHeartbeat: _h_heartbeat,
    ev.StepHeld: _h_nothing,  # the step's status does not change; the timeline row is the record
    ev.StepSucceeded: _h_succeeded,
    ev.StepFailed: _h_failed,
    ev.RetryScheduled: _h_retry,
    ev.StepTimedOut: _h_timed_out,
    ev.StepSkipped: _h_skipped,
    ev.StepCacheHit: _h_nothing,  # the StepSucceeded in the same commit records the output
    ev.LateResultRecorded: _h_nothing,
    ev.BudgetExceeded: _h_nothing,  # the RunFailed that follows carries the reason
    ev.ApprovalRefused: _h_nothing,
    ev.CompensationStarted: _h_comp_started,
    ev.CompensationFinished: _h_nothing,
    ev.RunResumed: _h_run_resumed,
    ev.StepRetryRequested: _h_retry_requested,
    ev.StepOutputSupplied: _h_output_supplied,
    ev.RunPaused: _h_nothing,  # the timeline row is the record
    ev.RunUnpaused: _h_nothing,
    ev.FeedbackGiven: _h_feedback,
    ev.GuardChecked: _h_guard,
})
