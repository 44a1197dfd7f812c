"""Applying commits to the projection: content and chain checks against the run's head, then rows
and a timeline entry per event, one transaction per batch (run on the SQLite thread)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from interlock.auditor.projection._rows import ROW_HANDLERS, RowEvent
from interlock.auditor.projection._schema import (
    POSITION_KEY,
    RUN_CHILDREN,
    TABLES,
    advance_position,
    dumps,
    loads,
    log,
    transaction,
)
from interlock.contracts import events as ev
from interlock.core import codec
from interlock.core.timeline import describe, is_int64, opt_field, short_hash, str_field
from interlock.core.verify import (
    HASH_MISMATCH,
    INVALID_DATA,
    MALFORMED,
    RUN_MISMATCH,
    TENANT_MISMATCH,
    UNKNOWN_TYPE,
    VerifyProblem,
    verify_envelopes,
)

MAX_RUN_PROBLEMS = 100  # problem lines kept per run; the count of the rest is kept too

# verify_envelopes kinds that break the audit chain (seq and link are checked here, against the
# projection's head, because a commit does not start at genesis)
CHAIN_KINDS = frozenset({HASH_MISMATCH, MALFORMED, RUN_MISMATCH, TENANT_MISMATCH})
# kinds that are worth a note on the event but do not make the chain untrustworthy (a newer
# producer may add event types or fields this auditor does not know yet)
NOTE_KINDS = frozenset({UNKNOWN_TYPE, INVALID_DATA})
_STARTED = ev.RunStarted.type_name

Envelopes = Sequence[Any]  # raw envelopes: dicts when well-formed, anything when not


# -- results -----------------------------------------------------------------------------------
@dataclass
class ApplyResult:
    """What :meth:`Projection.apply_commit` did with one commit."""

    run_id: str
    applied: int = 0  # events recorded
    skipped: int = 0  # redelivered events (or unusable ones)
    gap: bool = False  # ``hold_gaps``: nothing written, events are missing before this commit
    chain_ok: bool = True
    last_seq: int = 0
    last_stream_seq: int = 0  # stream sequence of the run's last applied commit
    problems: list[str] = field(default_factory=list)  # chain problems this commit added


@dataclass(frozen=True)
class Commit:
    """One commit of a run to project: its raw envelopes and, when read from the stream, its sequence."""

    tenant: str
    run_id: str
    envelopes: Envelopes
    stream_seq: int | None


# -- the writer (SQLite thread) ------------------------------------------------------------
def _is_seq(value: Any) -> bool:
    return is_int64(value) and value >= 1


_REQUIRED_FIELDS: tuple[tuple[str, type], ...] = (
    ("run_id", str), ("tenant", str), ("seq", int), ("type", str), ("at", str), ("data", dict), ("prev_hash", str),
    ("hash", str))


def _content_ok(envelope: Any, run_id: str, tenant: str) -> bool:
    """The checks :func:`verify_envelopes` makes on an event's own content, on the fast path.

    Everything verify_envelopes reports in CHAIN_KINDS or NOTE_KINDS fails here too, so a commit
    that passes needs no full verification (which, on a commit that does not start at genesis,
    would spend its time describing link and seq "problems" this module checks itself against the
    projection's head). A commit that fails is verified in full, for the precise problem lines.
    """
    if not isinstance(envelope, dict):
        return False
    for name, kind in _REQUIRED_FIELDS:
        value = envelope.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return False
    if envelope["run_id"] != run_id or envelope["tenant"] != tenant:
        return False
    data_cls = ev.EVENT_TYPES.get(envelope["type"])
    if data_cls is None:
        return False
    try:
        if codec.event_hash(envelope) != envelope["hash"]:
            return False
        datetime.fromisoformat(envelope["at"])
        data = data_cls.model_validate(envelope["data"])
    except (TypeError, ValueError):  # pydantic's ValidationError is a ValueError
        return False
    return not (isinstance(data, ev.RunStarted) and data.tenant != tenant)


def apply_one(conn: sqlite3.Connection, commit: Commit, hold_gaps: bool, careful: bool = False) -> ApplyResult:
    """Project one commit. ``careful``: every event in a savepoint, so one that cannot be written
    (a string SQLite cannot encode, say) is recorded as a placeholder instead of failing the batch."""
    run_id, tenant, envelopes = commit.run_id, commit.tenant, list(commit.envelopes)
    row = conn.execute("SELECT last_seq, head_hash, chain_ok, problems, problem_count, last_stream_seq "
                       "FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        last_seq, head_hash, chain_ok, run_problems, problem_count, last_stream = 0, ev.GENESIS_HASH, True, [], 0, 0
    else:
        last_seq, head_hash, chain_ok = int(row[0]), str(row[1]), bool(row[2])
        loaded = loads(row[3])
        run_problems = loaded if isinstance(loaded, list) else []
        problem_count, last_stream = int(row[4]), int(row[5])
    result = ApplyResult(run_id=run_id, last_seq=last_seq, last_stream_seq=last_stream, chain_ok=chain_ok)

    if hold_gaps:
        first_new = next((e["seq"] for e in envelopes if isinstance(e, dict) and _is_seq(e.get("seq"))
                          and e["seq"] > last_seq), None)
        if first_new is not None and first_new > last_seq + 1:
            result.gap = True
            return result

    if row is None:
        first = envelopes[0] if envelopes and isinstance(envelopes[0], dict) else {}
        conn.execute("INSERT INTO runs (run_id, tenant, status, head_hash, started_at) VALUES (?, ?, 'unknown', ?, ?)",
                     (run_id, tenant, ev.GENESIS_HASH, opt_field(first, "at")))

    by_position: dict[int, list[VerifyProblem]] = {}
    clean = all(_content_ok(envelope, run_id, tenant) for envelope in envelopes)
    if not clean:
        for problem in verify_envelopes(envelopes, run_id=run_id, tenant=tenant).problems:
            if problem.position is not None:
                by_position.setdefault(problem.position, []).append(problem)

    new_problems: list[str] = []
    for position, envelope in enumerate(envelopes, start=1):
        if not isinstance(envelope, dict) or not _is_seq(envelope.get("seq")):
            what = "not an object" if not isinstance(envelope, dict) else f"no valid seq ({envelope.get('seq')!r})"
            new_problems.append(f"position {position} of a commit after seq {last_seq}: malformed: {what}")
            result.skipped += 1
            continue
        seq: int = envelope["seq"]
        stored_hash = envelope.get("hash")
        if seq <= last_seq:
            known = conn.execute("SELECT hash FROM timeline WHERE run_id = ? AND seq = ?", (run_id, seq)).fetchone()
            if known is None or known[0] != stored_hash:
                before = "was never recorded" if known is None else f"was recorded with hash {short_hash(known[0], 12)}"
                new_problems.append(f"seq {seq}: seq_order: seq {seq} arrived again after seq {last_seq} with hash "
                                    f"{short_hash(stored_hash, 12)}; it {before}")
            result.skipped += 1
            continue

        chain: list[str] = []
        notes: list[str] = []
        if seq != last_seq + 1:
            chain.append(f"seq_gap: seq jumps from {last_seq} to {seq} ({seq - last_seq - 1} missing)")
        if envelope.get("prev_hash") != head_hash:
            chain.append(f"broken_link: prev_hash {short_hash(envelope.get('prev_hash'), 12)} is not the hash of "
                         f"the event before ({short_hash(head_hash, 12)})")
        type_name = str_field(envelope, "type", "?")
        if seq == 1 and type_name != _STARTED:
            chain.append(f"not_started: the first event is {type_name!r}, not {_STARTED!r}")
        elif seq != 1 and type_name == _STARTED:
            chain.append(f"duplicate_start: {_STARTED} after the first event")
        for problem in by_position.get(position, ()):
            if problem.kind in CHAIN_KINDS:
                chain.append(f"{problem.kind}: {problem.message}")
            elif problem.kind in NOTE_KINDS:
                notes.append(f"{problem.kind}: {problem.message}")

        event = RowEvent(run_id, seq, envelope)
        summary, details = describe(type_name, event.data)
        handler = ROW_HANDLERS.get(type_name)
        if careful:
            conn.execute("SAVEPOINT event")
            try:
                if handler is not None:
                    handler(conn, event)
                record(conn, event, envelope, summary, details, chain + notes)
            except Exception as e:  # keep the event's place in the log, without what cannot be stored
                conn.execute("ROLLBACK TO SAVEPOINT event")
                chain.append(f"unrecordable: {type(e).__name__}: {e!r}"[:500])
                conn.execute("INSERT OR REPLACE INTO timeline (run_id, seq, summary, details, problems) "
                             "VALUES (?, ?, ?, '{}', ?)", (run_id, seq, f"event could not be recorded ({type_name!r})"
                                                           .encode("utf-8", "replace").decode(), dumps(chain)))
            conn.execute("RELEASE SAVEPOINT event")
        else:
            if handler is not None and clean:
                handler(conn, event)  # data validated against its contract
            elif handler is not None:
                conn.execute("SAVEPOINT event")
                try:
                    handler(conn, event)
                except Exception as e:  # odd data must never stop the projection
                    conn.execute("ROLLBACK TO SAVEPOINT event")
                    notes.append(f"not projected: {type(e).__name__}: {e}")
                conn.execute("RELEASE SAVEPOINT event")
            record(conn, event, envelope, summary, details, chain + notes)
        new_problems.extend(f"seq {seq}: {line}" for line in chain)
        result.applied += 1
        last_seq = seq
        head_hash = stored_hash if isinstance(stored_hash, str) else ""

    if new_problems:
        chain_ok = False
        problem_count += len(new_problems)
        run_problems = (run_problems + new_problems)[:MAX_RUN_PROBLEMS]
    stream_seq = commit.stream_seq or 0
    last_stream = max(last_stream, stream_seq)
    conn.execute("UPDATE runs SET last_seq = ?, head_hash = ?, chain_ok = ?, problems = ?, problem_count = ?, "
                 "last_stream_seq = ? WHERE run_id = ?",
                 (last_seq, head_hash, int(chain_ok), dumps(run_problems), problem_count, last_stream, run_id))
    result.chain_ok, result.last_seq, result.last_stream_seq, result.problems = (
        chain_ok, last_seq, last_stream, new_problems)
    return result


def record(conn: sqlite3.Connection, event: RowEvent, envelope: dict[str, Any], summary: str, details: dict[str, Any],
           problems: list[str]) -> None:
    """Write the event's timeline entry."""
    conn.execute(
        "INSERT OR REPLACE INTO timeline (run_id, seq, at, type, service, step_id, attempt, summary, details, "
        "data, hash, prev_hash, problems) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (event.run_id, event.seq, event.at, event.type, opt_field(envelope, "service"), event.step_id, event.attempt,
         summary, dumps(details), dumps(envelope.get("data")), opt_field(envelope, "hash"),
         opt_field(envelope, "prev_hash"), dumps(problems)))


def apply_many(conn: sqlite3.Connection, items: Sequence[tuple[Commit, bool]]) -> list[ApplyResult]:
    """Apply ``(commit, hold_gaps)`` items in order, in one transaction, and advance the position."""

    def careful_one(commit: Commit, hold_gaps: bool) -> ApplyResult:
        conn.execute("SAVEPOINT run_commit")
        try:
            result = apply_one(conn, commit, hold_gaps, careful=True)
        except Exception as e:  # not even the run's row could be written: report, skip
            conn.execute("ROLLBACK TO SAVEPOINT run_commit")
            log.error("auditor projection: commit of run %s (stream seq %s) could not be projected: %r",
                      commit.run_id, commit.stream_seq, e)
            result = ApplyResult(run_id=commit.run_id, skipped=len(commit.envelopes), chain_ok=False,
                                 problems=[f"commit could not be projected: {e!r}"])
        conn.execute("RELEASE SAVEPOINT run_commit")
        return result

    def work(careful: bool) -> list[ApplyResult]:
        if careful:
            results = [careful_one(commit, hold_gaps) for commit, hold_gaps in items]
        else:
            results = [apply_one(conn, commit, hold_gaps) for commit, hold_gaps in items]
        done = [(commit, r) for (commit, _), r in zip(items, results, strict=True)
                if commit.stream_seq is not None and not r.gap]
        if done:
            advance_position(conn, max(c.stream_seq or 0 for c, _ in done), len(done),
                             sum(r.applied for _, r in done))
        return results

    try:
        return transaction(conn, lambda: work(careful=False))
    except (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.ProgrammingError, ValueError, TypeError,
            OverflowError) as e:  # odd input the fast path could not store: again, one event at a time
        log.warning("auditor projection: batch of %s commits failed (%r); projecting it event by event",
                    len(items), e)
        return transaction(conn, lambda: work(careful=True))


def wipe(conn: sqlite3.Connection, tenants: Sequence[str] | None) -> None:
    """Delete every run (or ``tenants``' runs) and what belongs to them."""
    def work() -> None:
        if tenants is None:
            for table in TABLES[:-1]:
                conn.execute(f"DELETE FROM {table}")
            # the stream the projection is bound to stays; the counts start again
            conn.execute("UPDATE projection_position SET stream_seq = 0, commits = 0, events = 0, rebuilt_at = NULL")
            return
        marks = ", ".join("?" * len(tenants))
        for table in RUN_CHILDREN:
            conn.execute(f"DELETE FROM {table} WHERE run_id IN (SELECT run_id FROM runs WHERE tenant IN ({marks}))",
                         tuple(tenants))
        conn.execute(f"DELETE FROM runs WHERE tenant IN ({marks})", tuple(tenants))
    transaction(conn, work)


def bind_stream(conn: sqlite3.Connection, created: str) -> bool:
    """Record the creation time of the stream projected; wipe everything (True) if it was another."""
    def work() -> bool:
        row = conn.execute("SELECT stream_created FROM projection_position WHERE stream = ?",
                           (POSITION_KEY,)).fetchone()
        stale = row is not None and row[0] is not None and row[0] != created
        if stale:
            for table in TABLES:
                conn.execute(f"DELETE FROM {table}")
        advance_position(conn, 0, 0, 0)
        conn.execute("UPDATE projection_position SET stream_created = ? WHERE stream = ?", (created, POSITION_KEY))
        return stale
    return transaction(conn, work)


def mark_rebuilt(conn: sqlite3.Connection, stream_seq: int, at: str) -> None:
    """Record that a rebuild read up to ``stream_seq``, at ``at``."""
    def work() -> None:
        advance_position(conn, stream_seq, 0, 0)
        conn.execute("UPDATE projection_position SET rebuilt_at = ? WHERE stream = ?", (at, POSITION_KEY))
    transaction(conn, work)
