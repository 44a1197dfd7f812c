"""The projection's SQLite schema, its JSON columns and its transactions (run on the SQLite thread)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from interlock.contracts import subjects as s
from interlock.core.sealed import redact

# one logger for the whole projection, named as before the package split
log = logging.getLogger("interlock.auditor.projection")

SCHEMA_VERSION = 3
POSITION_KEY = s.EVENTS_STREAM  # the projection_position row of the stream projected

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

T = TypeVar("T")

# the projection's tables; a change of SCHEMA_VERSION drops them all (they are rebuilt by replay)
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    workflow_id TEXT,
    workflow_version TEXT,
    definition_hash TEXT,
    status TEXT NOT NULL,
    idempotency_key TEXT,
    requested_by TEXT,
    rerun_of TEXT,
    started_at TEXT,
    ended_at TEXT,
    reason TEXT,
    last_seq INTEGER NOT NULL DEFAULT 0,
    head_hash TEXT NOT NULL,
    chain_ok INTEGER NOT NULL DEFAULT 1,
    problems TEXT NOT NULL DEFAULT '[]',
    problem_count INTEGER NOT NULL DEFAULT 0,
    last_stream_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started_at);
CREATE INDEX IF NOT EXISTS runs_tenant ON runs (tenant, started_at);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, started_at);
CREATE INDEX IF NOT EXISTS runs_workflow ON runs (workflow_id, started_at);
CREATE INDEX IF NOT EXISTS runs_key ON runs (idempotency_key);

CREATE TABLE IF NOT EXISTS usage (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    step_id TEXT NOT NULL,
    attempt INTEGER,
    at TEXT,
    calls INTEGER NOT NULL,
    models TEXT NOT NULL DEFAULT '[]',
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    step_type TEXT,
    topic TEXT,
    parent_id TEXT,
    compensation_of TEXT,
    item_count INTEGER,
    attempt INTEGER NOT NULL DEFAULT 0,
    job_hash TEXT,
    decision TEXT,
    snapshot_id TEXT,
    rule_ids TEXT,
    approval_status TEXT,
    approver TEXT,
    output TEXT,
    output_ref TEXT,
    error TEXT,
    started_at TEXT,
    ended_at TEXT,
    PRIMARY KEY (run_id, step_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    job_id TEXT,
    topic TEXT,
    dispatched_at TEXT,
    ended_at TEXT,
    outcome TEXT,
    worker TEXT,
    error TEXT,
    PRIMARY KEY (run_id, step_id, attempt)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS decisions (
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at TEXT,
    decision TEXT,
    snapshot_id TEXT,
    rule_ids TEXT,
    job_hash TEXT,
    reason TEXT,
    approver_role TEXT,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS approvals (
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    job_hash TEXT,
    snapshot_id TEXT,
    approver_role TEXT,
    prompt TEXT,
    approver TEXT,
    reason TEXT,
    requested_at TEXT,
    expires_at TEXT,
    decided_at TEXT,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS approvals_status ON approvals (status, requested_at);
CREATE INDEX IF NOT EXISTS approvals_step ON approvals (run_id, step_id, status);

CREATE TABLE IF NOT EXISTS timeline (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at TEXT,
    type TEXT,
    service TEXT,
    step_id TEXT,
    attempt INTEGER,
    summary TEXT NOT NULL,
    details TEXT NOT NULL,
    data TEXT,
    hash TEXT,
    prev_hash TEXT,
    problems TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

-- a person's feedback on step outputs (issue 17), one row per FeedbackGiven event
CREATE TABLE IF NOT EXISTS feedback (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    step_id TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    output_hash TEXT NOT NULL,
    by_principal TEXT NOT NULL,
    via TEXT,
    score REAL,
    correction TEXT,
    note TEXT,
    at TEXT,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE IF NOT EXISTS projection_position (
    stream TEXT PRIMARY KEY,
    stream_seq INTEGER NOT NULL DEFAULT 0,
    commits INTEGER NOT NULL DEFAULT 0,
    events INTEGER NOT NULL DEFAULT 0,
    rebuilt_at TEXT,
    stream_created TEXT  -- creation time of the stream projected: another stream, another history
);
"""

TABLES = ("runs", "steps", "attempts", "decisions", "approvals", "timeline", "usage", "feedback",
          "projection_position")
RUN_CHILDREN = ("steps", "attempts", "decisions", "approvals", "timeline", "usage", "feedback")


def dumps(value: Any) -> str | None:
    """A JSON column's text (``repr`` as a JSON string for what JSON cannot hold); None stays NULL."""
    if value is None:
        return None
    value = redact(value)  # sensitive values: the marker (their ciphertext stays in the log only)
    try:
        return _encoder.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        return _encoder.encode(repr(value)).decode()


def loads(value: str | None) -> Any:
    """A JSON column's value (the text itself when it is not JSON)."""
    if value is None:
        return None
    try:
        return _decoder.decode(value)
    except msgspec.DecodeError:
        return value


def advance_position(conn: sqlite3.Connection, stream_seq: int, commits: int, events: int) -> None:
    """Raise the projected stream position to ``stream_seq`` (never lower it) and add to its counts."""
    conn.execute("INSERT INTO projection_position (stream, stream_seq, commits, events) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT (stream) DO UPDATE SET stream_seq = MAX(stream_seq, excluded.stream_seq), "
                 "commits = commits + excluded.commits, events = events + excluded.events",
                 (POSITION_KEY, stream_seq, commits, events))


def transaction(conn: sqlite3.Connection, work: Callable[[], T]) -> T:
    """Run ``work()`` in one write transaction, rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        value = work()
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return value


def init_schema(conn: sqlite3.Connection) -> None:
    """Create the tables; drop them first if they are of another schema version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
        log.warning("auditor projection schema %s is not %s: dropping it (rebuild by replay)", version, SCHEMA_VERSION)
        for table in TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
