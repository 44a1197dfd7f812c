"""The auditor's query projection: runs, steps, attempts, decisions, approvals and a timeline in SQLite.

The projection is a *cache* of the run logs in ``IL_EVENTS`` (invariant 1): it can be thrown away
at any time and rebuilt by :meth:`Projection.rebuild`. It is fed one commit at a time with
:meth:`Projection.apply_commit`, which is idempotent:

- events whose ``seq`` is at or below the run's ``last_seq`` are redeliveries and are skipped
  (an event that repeats a seq with a *different* hash is a fork or a rewrite: it is flagged);
- an event whose ``seq`` is not ``last_seq + 1``, whose ``prev_hash`` is not the stored head
  hash, whose own hash does not match its content (checked with
  :func:`interlock.core.verify.verify_envelopes`), or that names another run or tenant, marks the
  run ``chain_ok = 0`` with a problem line, and is still recorded so the timeline shows it;
- odd input never raises: a non-object, an unknown event type or data that does not fit its
  contract is stored (or counted) with a summary that says so.

Each commit is written atomically: commits that arrive while a write is under way are written
together in the next transaction (group commit), and a rebuild writes one transaction per fetched
batch. All SQL runs on aiosqlite's worker thread, one hop per transaction; a commit whose events
all pass the content checks skips the full verifier, whose report on a commit that does not start
at genesis is mostly about the link and seq checked here against the projection's head.
Measured on 2 busy cores: ~4-5k events/s live and in a rebuild (CPU-bound in Python).

This package is the async facade :class:`Projection` over private modules that run on the
SQLite thread: ``_schema`` (tables, JSON columns, transactions), ``_rows`` (what each event type
changes), ``_apply`` (checks and writes a batch of commits) and ``_queries``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from interlock.auditor.projection._apply import (
    ApplyResult,
    Commit,
    Envelopes,
    apply_many,
    bind_stream,
    mark_rebuilt,
    wipe,
)
from interlock.auditor.projection._queries import (
    q_approvals,
    q_counts,
    q_failures,
    q_feedback,
    q_position,
    q_runs,
    q_status,
    q_timeline,
    q_usage,
)
from interlock.auditor.projection._schema import advance_position, init_schema, log, transaction
from interlock.contracts import subjects as s
from interlock.core import codec
from interlock.core.timeline import UNKNOWN_TYPE_SUMMARY, describe, short_hash  # re-exported; they live there

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from interlock.core.eventstore import EventStore

T = TypeVar("T")

DEFAULT_PATH = ".interlock/auditor.sqlite3"
GROUP_COMMIT_MAX = 4096  # commits written in one transaction by the live writer


@dataclass
class RebuildStats:
    """Counts reported by :meth:`Projection.rebuild` (and passed to its progress callback)."""

    messages: int = 0  # stream messages read
    commits: int = 0  # commits applied
    events: int = 0  # events recorded
    skipped: int = 0
    bad_messages: int = 0  # messages that are not a commit on a run subject
    runs: int = 0  # runs rebuilt (of the tenants asked for)
    broken_runs: int = 0  # of those, runs whose chain did not verify
    stream_seq: int = 0  # last stream sequence read
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        text = f"{self.events} events in {self.commits} commits (stream seq {self.stream_seq})"
        if self.runs:
            text += f", {self.runs} runs, {self.broken_runs} with a broken chain"
        if self.bad_messages:
            text += f", {self.bad_messages} unreadable messages"
        if self.seconds:
            text += f", {self.seconds:.2f} s"
        return text


ProgressCallback = Callable[[RebuildStats], None]


# -- the async face ----------------------------------------------------------------------------
class Projection:
    """The SQLite query projection of every run (see the module docstring).

    ``path`` is a file (created with its directory, WAL mode) or ``":memory:"``. Methods open the
    database on first use; :meth:`close` it when done (or use ``async with``).
    """

    def __init__(self, path: str | Path = DEFAULT_PATH) -> None:
        self.path = str(path)
        self._db: aiosqlite.Connection | None = None
        self._open_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        # group commit: commits waiting for the writer task, applied together in one transaction
        self._pending: list[tuple[Commit, bool, asyncio.Future[ApplyResult]]] = []
        self._writer: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> Projection:
        async with self._open_lock:
            if self._db is not None:
                return self
            if self.path != ":memory:" and not self.path.startswith("file:"):
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None, timeout=30.0)
            try:
                db.row_factory = sqlite3.Row
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA synchronous = NORMAL")
                await db.execute("PRAGMA temp_store = MEMORY")
                await db._execute(init_schema, db._conn)
            except BaseException:
                await db.close()
                raise
            self._db = db
            return self

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.wait([self._writer])
        async with self._open_lock:
            if self._db is not None:
                db, self._db = self._db, None
                await db.close()

    async def __aenter__(self) -> Projection:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(sqlite3_connection, *args)`` on aiosqlite's thread: one hop for a whole unit of work."""
        if self._db is None:
            await self.open()
        db = self._db
        assert db is not None
        # aiosqlite has no public "run this function on your thread"; _execute is that primitive
        result: T = await db._execute(fn, db._conn, *args)
        return result

    # -- writing ---------------------------------------------------------------------------
    async def apply_commit(self, tenant: str, run_id: str, envelopes: Envelopes, *, stream_seq: int | None = None,
                           hold_gaps: bool = False) -> ApplyResult:
        """Project one commit of a run, atomically; idempotent (see the module docstring).

        ``stream_seq`` is the commit's stream sequence (kept as the projection's position). With
        ``hold_gaps`` a commit that does not follow the run's last projected event directly is not
        written: the result has ``gap=True`` and the caller fetches what is missing first.
        """
        future: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        self._enqueue(Commit(tenant, run_id, envelopes, stream_seq), hold_gaps, future)
        return await future

    async def apply_commits(self, commits: Iterable[tuple[str, str, Envelopes, int | None]], *,
                            hold_gaps: bool = False) -> list[ApplyResult]:
        """Project several commits, in order, each atomically.

        Calls made while a write is under way are queued and written together, in the order they
        were made, in the next transaction (group commit, up to GROUP_COMMIT_MAX commits): under
        load many consumers' commits cost one SQLite transaction and one thread hop; when idle a
        call is written at once.
        """
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ApplyResult]] = []
        for tenant, run_id, envelopes, seq in commits:
            future: asyncio.Future[ApplyResult] = loop.create_future()
            self._enqueue(Commit(tenant, run_id, envelopes, seq), hold_gaps, future)
            futures.append(future)
        return list(await asyncio.gather(*futures))

    def _enqueue(self, commit: Commit, hold_gaps: bool, future: asyncio.Future[ApplyResult]) -> None:
        self._pending.append((commit, hold_gaps, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_pending(), name=f"auditor-projection-writer:{self.path}")

    async def _write_pending(self) -> None:
        batch: list[tuple[Commit, bool, asyncio.Future[ApplyResult]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[:GROUP_COMMIT_MAX], self._pending[GROUP_COMMIT_MAX:]
                try:
                    async with self._write_lock:
                        results = await self._call(apply_many, [(commit, hold) for commit, hold, _ in batch])
                except Exception as e:  # a database error: every caller in the batch sees it (and retries)
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, _, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._writer = None
            # only when the writer itself was cancelled: nobody may wait forever
            for _, _, future in [*batch, *self._pending]:
                if not future.done():
                    future.cancel()
            self._pending = []

    async def note_position(self, stream_seq: int) -> None:
        """Record that a stream message was handled without projecting it (e.g. dead-lettered)."""
        async with self._write_lock:
            await self._call(lambda conn: transaction(conn, lambda: advance_position(conn, stream_seq, 0, 0)))

    async def bind_stream(self, js: JetStreamContext) -> bool:
        """Tie the projection to the ``IL_EVENTS`` stream it projects (by the stream's creation time).

        A projection built from another stream (the server's store was reset, the stream was
        recreated) describes another history: it is wiped. Returns True when it was.
        """
        info = await js.stream_info(s.EVENTS_STREAM)
        created = info.created.isoformat() if info.created is not None else ""
        async with self._write_lock:
            stale = await self._call(bind_stream, created)
        if stale:
            log.warning("auditor projection %s was built from another %s stream: wiped", self.path, s.EVENTS_STREAM)
        return stale

    async def wipe(self, tenants: Sequence[str] | None = None) -> None:
        """Delete everything (or every run of ``tenants``)."""
        async with self._write_lock:
            await self._call(wipe, list(tenants) if tenants is not None else None)

    async def rebuild(self, store: EventStore, tenants: Sequence[str] | None = None, *,
                      progress: ProgressCallback | None = None, every: int = 10_000, batch: int = 2000,
                      fetch_timeout: float = 5.0) -> RebuildStats:
        """Wipe the projection (or ``tenants``' runs), then replay ``IL_EVENTS`` in stream order.

        Reads with an ephemeral, unacknowledged pull consumer over the whole stream (or the
        tenants' subjects), ``batch`` messages per fetch, the next fetch overlapping the write of
        the previous batch; a gap in the consumer sequence (a message lost on the way) restarts
        the consumer after the last stream sequence applied, as an ordered consumer does.
        ``progress(stats)`` is called about every ``every`` events and once at the end. Live
        :meth:`apply_commit` calls in this process wait until the rebuild is done.
        """
        started = time.monotonic()
        stats = RebuildStats()
        tenant_list = list(tenants) if tenants is not None else None
        subjects = [s.tenant_events(t) for t in tenant_list] if tenant_list else [s.EVENTS_ALL]
        await self.bind_stream(store.js)
        async with self._write_lock:
            await self._call(wipe, tenant_list)
            next_report = every
            start_seq = 1
            while True:
                restart_at = await self._replay_from(store, subjects, start_seq, batch, fetch_timeout, stats,
                                                     progress, every, next_report)
                if restart_at is None:
                    break
                log.warning("rebuild: consumer sequence gap, resuming after stream seq %s", restart_at - 1)
                start_seq = restart_at
                next_report = stats.events + every
            await self._call(mark_rebuilt, stats.stream_seq, datetime.now(UTC).isoformat())
            stats.runs, stats.broken_runs = await self._call(q_counts, tenant_list)
        stats.seconds = round(time.monotonic() - started, 3)
        if progress is not None:
            progress(stats)
        return stats

    async def _replay_from(self, store: EventStore, subjects: list[str], start_seq: int, batch: int,
                           fetch_timeout: float, stats: RebuildStats, progress: ProgressCallback | None,
                           every: int, next_report: int) -> int | None:
        """Read from ``start_seq`` to the end; the stream seq to restart from after a gap, else None."""
        js = store.js
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq, ack_policy=AckPolicy.NONE,
            mem_storage=True, inactive_threshold=60.0, filter_subjects=subjects if len(subjects) > 1 else None)
        sub = await js.pull_subscribe(subjects[0], durable=None, stream=s.EVENTS_STREAM, config=config)
        consumer = sub._consumer  # the generated ephemeral consumer name
        fetch: asyncio.Future[list[Any]] | None = None
        try:
            info = await sub.consumer_info()
            pending = int(info.num_pending or 0)
            consumer_seq = 0
            idle = 0
            while pending > 0 or fetch is not None:
                if fetch is None:
                    fetch = asyncio.ensure_future(sub.fetch(batch, timeout=fetch_timeout))
                try:
                    msgs = await fetch
                except TimeoutError:
                    fetch = None
                    idle += 1
                    info = await sub.consumer_info()
                    pending = int(info.num_pending or 0)
                    if idle > 5 and pending > 0:
                        raise RuntimeError(f"rebuild stalled with {pending} messages pending") from None
                    continue
                fetch = None
                idle = 0
                commits: list[Commit] = []
                for msg in msgs:
                    meta = msg.metadata
                    if meta.sequence.consumer != consumer_seq + 1:
                        # a lost message: apply what came before it, then restart after the last one
                        await self._apply_rebuild_batch(commits, stats)
                        return stats.stream_seq + 1
                    consumer_seq = meta.sequence.consumer
                    stats.messages += 1
                    stats.stream_seq = meta.sequence.stream
                    pending = int(meta.num_pending or 0)
                    try:
                        tenant, run_id = s.parse_run_events(msg.subject)
                        envelopes = codec.decode_commit_raw(msg.data)["events"]
                    except ValueError as e:
                        stats.bad_messages += 1
                        log.warning("rebuild: stream seq %s on %s is not a commit: %s", meta.sequence.stream,
                                    msg.subject, e)
                        continue
                    commits.append(Commit(tenant, run_id, envelopes, meta.sequence.stream))
                if pending > 0:  # overlap the next fetch with this batch's write
                    fetch = asyncio.ensure_future(sub.fetch(batch, timeout=fetch_timeout))
                await self._apply_rebuild_batch(commits, stats)
                if progress is not None and stats.events >= next_report:
                    progress(stats)
                    next_report = stats.events + every
            return None
        finally:
            if fetch is not None and not fetch.done():
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fetch
            await sub.unsubscribe()
            with contextlib.suppress(NotFoundError, TimeoutError):  # else it expires after inactive_threshold
                await js.delete_consumer(s.EVENTS_STREAM, consumer)

    async def _apply_rebuild_batch(self, commits: list[Commit], stats: RebuildStats) -> None:
        if not commits:
            return
        results = await self._call(apply_many, [(commit, False) for commit in commits])
        stats.commits += len(results)
        stats.events += sum(r.applied for r in results)
        stats.skipped += sum(r.skipped for r in results)

    # -- queries ---------------------------------------------------------------------------
    async def runs(self, tenant: str | None = None, status: str | None = None, workflow_id: str | None = None,
                   limit: int = 100, *, idempotency_key: str | None = None, started_after: str | None = None,
                   started_before: str | None = None, before: tuple[str, str] | None = None
                   ) -> list[dict[str, Any]]:
        """Runs, newest first; ``before`` (started_at, run_id) continues after that run (a page cursor)."""
        return await self._call(lambda conn: q_runs(
            conn, tenant, status, workflow_id, limit, idempotency_key=idempotency_key, started_after=started_after,
            started_before=started_before, before=before))

    async def status(self, run_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The run and its steps (in order of first appearance); None if the run is unknown."""
        return await self._call(q_status, run_id, tenant)

    async def timeline(self, run_id: str, tenant: str | None = None, *, with_data: bool = False,
                       after_seq: int = 0, limit: int | None = None) -> list[dict[str, Any]] | None:
        """The run's events after seq ``after_seq`` (at most ``limit``) in seq order, summarised;
        None if the run is unknown."""
        return await self._call(q_timeline, run_id, tenant, with_data, after_seq, limit)

    async def approvals(self, tenant: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Pending approval requests of active runs, oldest first."""
        return await self._call(q_approvals, tenant, limit)

    async def usage(self, *, tenant: str | None = None, group_by: str = "workflow", run_id: str | None = None,
                    workflow_id: str | None = None, since: datetime | None = None, limit: int = 100
                    ) -> list[dict[str, Any]]:
        """Model usage summed per ``group_by`` (run, workflow or tenant), most expensive first."""
        return await self._call(q_usage, tenant, group_by, run_id, workflow_id,
                                since.isoformat() if since is not None else None, limit)

    async def failures(self, *, tenant: str | None = None, workflow_id: str, since: datetime | None = None,
                       limit: int = 1000) -> list[dict[str, Any]]:
        """A workflow's failed runs, newest first, with the step and error each broke at."""
        return await self._call(q_failures, tenant, workflow_id, since.isoformat() if since is not None else None,
                                limit)

    async def feedback(self, *, tenant: str | None = None, run_id: str | None = None,
                       workflow_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Feedback on step outputs (of a run, or a workflow's runs), oldest first."""
        return await self._call(q_feedback, tenant, run_id, workflow_id, limit)

    async def last_seq(self, run_id: str) -> int:
        row = await self._call(lambda conn: conn.execute("SELECT last_seq FROM runs WHERE run_id = ?",
                                                         (run_id,)).fetchone())
        return int(row[0]) if row is not None else 0

    async def position(self) -> dict[str, Any]:
        """How far into ``IL_EVENTS`` the projection is: highest stream seq applied, counts, last rebuild."""
        return await self._call(q_position)


__all__ = [
    "DEFAULT_PATH",
    "UNKNOWN_TYPE_SUMMARY",
    "ApplyResult",
    "Envelopes",
    "ProgressCallback",
    "Projection",
    "RebuildStats",
    "describe",
    "short_hash",
]
