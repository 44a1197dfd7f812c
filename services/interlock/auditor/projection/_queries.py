"""The projection's queries (run on the SQLite thread): each ``q_<name>`` backs ``Projection.<name>``."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from interlock.auditor.projection._schema import POSITION_KEY, loads

_RUN_COLUMNS = ("run_id", "tenant", "workflow_id", "workflow_version", "definition_hash", "status",
                "idempotency_key", "requested_by", "rerun_of", "started_at", "ended_at", "reason", "last_seq",
                "head_hash", "chain_ok", "problem_count")


def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
    out = {name: row[name] for name in _RUN_COLUMNS}
    out["chain_ok"] = bool(out["chain_ok"])
    out["events"] = out["last_seq"]
    return out


def q_runs(conn: sqlite3.Connection, tenant: str | None, status: str | None, workflow_id: str | None,
           limit: int, *, idempotency_key: str | None = None, started_after: str | None = None,
           started_before: str | None = None, before: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """Runs newest first; ``before`` (started_at, run_id): the page after that run (a cursor)."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("tenant", tenant), ("status", status), ("workflow_id", workflow_id),
                          ("idempotency_key", idempotency_key)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if started_after is not None:
        where.append("started_at >= ?")
        params.append(started_after)
    if started_before is not None:
        where.append("started_at < ?")
        params.append(started_before)
    if before is not None:
        where.append("(started_at < ? OR (started_at = ? AND run_id < ?))")
        params += [before[0], before[0], before[1]]
    sql = f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY started_at DESC, run_id DESC LIMIT ?"
    params.append(max(0, limit))
    return [_run_dict(row) for row in conn.execute(sql, params)]


def _find_run(conn: sqlite3.Connection, run_id: str, tenant: str | None) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(
        f"SELECT {', '.join(_RUN_COLUMNS)}, problems FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None or (tenant is not None and row["tenant"] != tenant):
        return None
    return row


def q_status(conn: sqlite3.Connection, run_id: str, tenant: str | None) -> dict[str, Any] | None:
    row = _find_run(conn, run_id, tenant)
    if row is None:
        return None
    out = _run_dict(row)
    problems = loads(row["problems"])
    out["problems"] = problems if isinstance(problems, list) else []
    # paused (issue 17): the latest pause or unpause in the run's timeline says
    last = conn.execute("SELECT type FROM timeline WHERE run_id = ? AND type IN ('RunPaused', 'RunUnpaused') "
                        "ORDER BY seq DESC LIMIT 1", (run_id,)).fetchone()
    out["paused"] = last is not None and last["type"] == "RunPaused"

    history: dict[str, list[dict[str, Any]]] = {}
    for a in conn.execute("SELECT step_id, attempt, job_id, topic, dispatched_at, ended_at, outcome, worker, error "
                          "FROM attempts WHERE run_id = ? ORDER BY step_id, attempt", (run_id,)):
        history.setdefault(a["step_id"], []).append({
            "attempt": a["attempt"], "job_id": a["job_id"], "topic": a["topic"], "dispatched_at": a["dispatched_at"],
            "ended_at": a["ended_at"], "outcome": a["outcome"], "worker": a["worker"], "error": a["error"]})
    approvals: dict[str, dict[str, Any]] = {}
    for a in conn.execute("SELECT step_id, seq, status, job_hash, snapshot_id, approver_role, prompt, approver, "
                          "reason, requested_at, expires_at, decided_at FROM approvals WHERE run_id = ? ORDER BY seq",
                          (run_id,)):
        approvals[a["step_id"]] = {  # the latest request of each step wins
            "status": a["status"], "job_hash": a["job_hash"], "snapshot_id": a["snapshot_id"],
            "approver_role": a["approver_role"], "prompt": a["prompt"], "approver": a["approver"],
            "reason": a["reason"], "requested_at": a["requested_at"], "expires_at": a["expires_at"],
            "decided_at": a["decided_at"], "seq": a["seq"]}
    usage: dict[str, dict[str, Any]] = {}
    for u in conn.execute("SELECT step_id, SUM(calls) AS calls, SUM(input_tokens) AS input_tokens, SUM(output_tokens) "
                          "AS output_tokens, SUM(cost_usd) AS cost_usd FROM usage WHERE run_id = ? GROUP BY step_id",
                          (run_id,)):
        usage[u["step_id"]] = {"calls": u["calls"], "input_tokens": u["input_tokens"],
                               "output_tokens": u["output_tokens"], "cost_usd": round(u["cost_usd"] or 0.0, 6)}
    if usage:
        out["usage"] = {key: sum(step[key] for step in usage.values())
                        for key in ("calls", "input_tokens", "output_tokens", "cost_usd")}
    steps: list[dict[str, Any]] = []
    for st in conn.execute("SELECT * FROM steps WHERE run_id = ? ORDER BY first_seq, step_id", (run_id,)):
        attempts = history.get(st["step_id"], [])
        decision = None
        if st["decision"] is not None:
            decision = {"decision": st["decision"], "snapshot_id": st["snapshot_id"],
                        "rule_ids": loads(st["rule_ids"]) or []}
        steps.append({
            "step_id": st["step_id"], "status": st["status"], "step_type": st["step_type"], "topic": st["topic"],
            "parent_id": st["parent_id"], "compensation_of": st["compensation_of"], "item_count": st["item_count"],
            "attempt": st["attempt"], "attempts": len(attempts), "history": attempts, "job_hash": st["job_hash"],
            "decision": decision, "approval_status": st["approval_status"], "approver": st["approver"],
            "approval": approvals.get(st["step_id"]), "output": loads(st["output"]),
            "output_ref": loads(st["output_ref"]), "error": st["error"], "started_at": st["started_at"],
            "ended_at": st["ended_at"], "usage": usage.get(st["step_id"]),
        })
    out["steps"] = steps
    return out


def q_timeline(conn: sqlite3.Connection, run_id: str, tenant: str | None, with_data: bool,
               after_seq: int = 0, limit: int | None = None) -> list[dict[str, Any]] | None:
    if _find_run(conn, run_id, tenant) is None:
        return None
    entries: list[dict[str, Any]] = []
    for row in conn.execute("SELECT seq, at, service, type, step_id, attempt, summary, details, data, hash, problems "
                            "FROM timeline WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                            (run_id, after_seq, -1 if limit is None else max(0, limit))):
        entry = {"seq": row["seq"], "at": row["at"], "service": row["service"], "type": row["type"],
                 "step_id": row["step_id"], "attempt": row["attempt"], "summary": row["summary"],
                 "details": loads(row["details"]) or {}, "hash": row["hash"],
                 "problems": loads(row["problems"]) or []}
        if with_data:
            entry["data"] = loads(row["data"])
        entries.append(entry)
    return entries


def q_approvals(conn: sqlite3.Connection, tenant: str | None, limit: int) -> list[dict[str, Any]]:
    sql = ("SELECT a.run_id, r.tenant, r.workflow_id, a.step_id, a.seq, a.job_hash, a.snapshot_id, a.approver_role, "
           "a.prompt, a.requested_at, a.expires_at FROM approvals a JOIN runs r ON r.run_id = a.run_id "
           "WHERE a.status = 'requested' AND r.status IN ('running', 'compensating')")
    params: list[Any] = []
    if tenant is not None:
        sql += " AND r.tenant = ?"
        params.append(tenant)
    sql += " ORDER BY a.requested_at, a.run_id, a.seq LIMIT ?"
    params.append(max(0, limit))
    return [{"run_id": r["run_id"], "tenant": r["tenant"], "workflow_id": r["workflow_id"], "step_id": r["step_id"],
             "seq": r["seq"], "job_hash": r["job_hash"], "snapshot_id": r["snapshot_id"],
             "approver_role": r["approver_role"], "prompt": r["prompt"], "requested_at": r["requested_at"],
             "expires_at": r["expires_at"]} for r in conn.execute(sql, params)]


def q_feedback(conn: sqlite3.Connection, tenant: str | None, run_id: str | None, workflow_id: str | None,
               limit: int) -> list[dict[str, Any]]:
    """Feedback on step outputs, oldest first, with the output it is about (issue 17)."""
    sql = ("SELECT f.run_id, f.seq, r.workflow_id, r.workflow_version, f.step_id, f.attempt, f.output_hash, "
           "s.output, f.by_principal, f.via, f.score, f.correction, f.note, f.at FROM feedback f "
           "JOIN runs r ON r.run_id = f.run_id LEFT JOIN steps s ON s.run_id = f.run_id AND s.step_id = f.step_id "
           "WHERE 1 = 1")
    params: list[Any] = []
    for column, value in (("r.tenant", tenant), ("f.run_id", run_id), ("r.workflow_id", workflow_id)):
        if value is not None:
            sql += f" AND {column} = ?"
            params.append(value)
    sql += " ORDER BY f.at, f.run_id, f.seq LIMIT ?"
    params.append(max(0, limit))
    return [{"run_id": r["run_id"], "seq": r["seq"], "workflow_id": r["workflow_id"],
             "workflow_version": r["workflow_version"], "step_id": r["step_id"], "attempt": r["attempt"],
             "output_hash": r["output_hash"], "output": loads(r["output"]), "by": r["by_principal"],
             "via": r["via"] or "", "score": r["score"], "correction": loads(r["correction"]), "note": r["note"] or "",
             "at": r["at"]} for r in conn.execute(sql, params)]


USAGE_KEYS = {"run": "u.run_id", "workflow": "r.workflow_id", "tenant": "r.tenant"}


def q_usage(conn: sqlite3.Connection, tenant: str | None, group_by: str, run_id: str | None,
            workflow_id: str | None, since: str | None, limit: int) -> list[dict[str, Any]]:
    """Model usage summed per run, workflow or tenant, most expensive first."""
    key = USAGE_KEYS[group_by]
    sql = (f"SELECT {key} AS key, COUNT(DISTINCT u.run_id) AS runs, SUM(u.calls) AS calls, "
           "SUM(u.input_tokens) AS input_tokens, SUM(u.output_tokens) AS output_tokens, SUM(u.cost_usd) AS cost_usd "
           "FROM usage u JOIN runs r ON r.run_id = u.run_id WHERE 1 = 1")
    params: list[Any] = []
    for column, value in (("r.tenant", tenant), ("u.run_id", run_id), ("r.workflow_id", workflow_id)):
        if value is not None:
            sql += f" AND {column} = ?"
            params.append(value)
    if since is not None:
        sql += " AND julianday(u.at) >= julianday(?)"  # both ISO 8601, with Z or an offset
        params.append(since)
    sql += f" GROUP BY {key} ORDER BY cost_usd DESC, key LIMIT ?"
    params.append(max(0, limit))
    return [{"key": r["key"], "runs": r["runs"], "calls": r["calls"], "input_tokens": r["input_tokens"],
             "output_tokens": r["output_tokens"], "cost_usd": round(r["cost_usd"] or 0.0, 6)}
            for r in conn.execute(sql, params)]


def q_position(conn: sqlite3.Connection) -> dict[str, Any]:
    row = conn.execute("SELECT stream_seq, commits, events, rebuilt_at, stream_created FROM projection_position "
                       "WHERE stream = ?", (POSITION_KEY,)).fetchone()
    if row is None:
        return {"stream": POSITION_KEY, "stream_seq": 0, "commits": 0, "events": 0, "rebuilt_at": None,
                "stream_created": None}
    return {"stream": POSITION_KEY, "stream_seq": row[0], "commits": row[1], "events": row[2], "rebuilt_at": row[3],
            "stream_created": row[4]}


def q_counts(conn: sqlite3.Connection, tenants: Sequence[str] | None) -> tuple[int, int]:
    sql, params = "SELECT COUNT(*), COALESCE(SUM(chain_ok = 0), 0) FROM runs", tuple(tenants or ())
    if tenants is not None:
        sql += f" WHERE tenant IN ({', '.join('?' * len(tenants))})"
    row = conn.execute(sql, params).fetchone()
    return int(row[0]), int(row[1])


FAILED_RUN_STATUSES = ("failed", "timed_out")


def q_failures(conn: sqlite3.Connection, tenant: str | None, workflow_id: str, since: str | None,
               limit: int) -> list[dict[str, Any]]:
    """A workflow's failed runs, newest first, each with its first failed step and that step's error
    (the failures query; ``interlock run failures`` groups them by step and error)."""
    where = ["r.workflow_id = ?", f"r.status IN ({', '.join('?' for _ in FAILED_RUN_STATUSES)})"]
    params: list[Any] = [workflow_id, *FAILED_RUN_STATUSES]
    if tenant is not None:
        where.append("r.tenant = ?")
        params.append(tenant)
    if since is not None:
        where.append("r.started_at >= ?")
        params.append(since)
    sql = ("SELECT r.run_id, r.started_at, r.reason, "
           "(SELECT st.step_id FROM steps st WHERE st.run_id = r.run_id AND st.status = 'failed' "
           " ORDER BY st.first_seq LIMIT 1) AS step_id, "
           "(SELECT st.error FROM steps st WHERE st.run_id = r.run_id AND st.status = 'failed' "
           " ORDER BY st.first_seq LIMIT 1) AS error "
           f"FROM runs r WHERE {' AND '.join(where)} ORDER BY r.started_at DESC, r.run_id DESC LIMIT ?")
    params.append(max(0, limit))
    return [{"run_id": row["run_id"], "started_at": row["started_at"], "reason": row["reason"],
             "step_id": row["step_id"], "error": row["error"]} for row in conn.execute(sql, params)]
