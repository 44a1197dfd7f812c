"""The run repository: runs loaded by replay, cached, brought forward, and appended to.

- A run's log is every subject below ``subjects.run_events(tenant, run_id)``; each message is one commit
  of events, appended through the :class:`~interlock.core.eventstore.recorder.JetStreamRecorder`
  (conditional on the run's last stream sequence, deduplicated by a message id derived from the
  run, the position and the content).
- Loads replay the run's commits and check the hash chain and each commit's authorship
  (:mod:`~interlock.core.eventstore.authenticity`): a commit that fails is skipped, never
  applied, and never stops the run. Recently used runs stay in an LRU
  cache and are brought forward by the commits a service consumes (:meth:`EventStore.observe`);
  a conflict throws the cached copy away and replays.
- Updates of one run that queue up while another is appending are decided together and appended
  as one commit (group commit).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from interlock.contracts import events as ev
from interlock.contracts import routing
from interlock.contracts import subjects as s
from interlock.core import codec
from interlock.core.eventstore.authenticity import BROKEN_LINK, Authenticity, Refusal
from interlock.core.eventstore.errors import (
    ChainBroken,
    Conflict,
    EventStoreError,
    RunExists,
    RunNotFound,
    StaleState,
    TooManyConflicts,
)
from interlock.core.eventstore.recorder import JetStreamRecorder, StoredCommit, stored_commit
from interlock.core.retry import Backoff, spread
from interlock.core.run import IllegalTransition, Run

MAX_COMMIT_EVENTS = 1024  # larger batches are split so one message stays well under max payload
# after a conflict: back off a little, growing, spread per run (1 ms, 2 ms, … up to 50 ms)
CONFLICT_BACKOFF = Backoff(first=0.001, cap=0.05, growth=1.0, step=0.001)


@dataclass
class RunHandle:
    """A run as of a position in the stream."""

    run: Run
    tenant: str
    stream_seq: int  # stream sequence of the run's last commit
    last_hash: str

    @property
    def run_id(self) -> str:
        return str(self.run.id)

    @property
    def version(self) -> int:
        return int(self.run.version)


Decide = Callable[[Run], Awaitable[None] | None]


class EventStore:
    """Load and append run events on JetStream. One per process; safe for concurrent tasks."""

    def __init__(self, nc: NATS, js: JetStreamContext, *, service: str, cache_size: int = 1024,
                 publish_timeout: float = 5.0, failover_patience: float = 30.0, slots: Sequence[str] = (),
                 authenticity: Authenticity | None = None, writer: str | None = None) -> None:
        """``writer``: the routing token of what this store appends (default ``service``): whose
        commits these are, for the consumers' filters (``contracts.routing``)."""
        self.writer = writer or service
        self.recorder = JetStreamRecorder(nc, js, stream=s.EVENTS_STREAM, publish_timeout=publish_timeout,
                                          failover_patience=failover_patience, slots=slots)
        self.nc = nc
        self.js = js
        self.service = service
        self.authenticity = authenticity or Authenticity()
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], RunHandle] = OrderedDict()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # highest stream sequence of each run's commits this process has seen delivered: a cached
        # or freshly loaded run behind it is stale (the commit may have arrived mid-load)
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()
        self.stats = {"appends": 0, "conflicts": 0, "loads": 0, "cache_hits": 0, "grouped": 0}
        self._pending: dict[tuple[str, str], list[_Pending]] = {}
        self.checkpoint: Callable[[], Awaitable[None]] | None = None
        """Awaited before each update (the service's lanes: slow-lane work gives way to fast)."""

    # -- reading -----------------------------------------------------------------------------
    async def read_commits(self, tenant: str, run_id: str, after_seq: int = 0) -> list[StoredCommit]:
        """Every commit of a run after stream sequence ``after_seq``, in order (batched direct get,
        or the recorder's slot consumers)."""
        return await self.recorder.read_commits(s.run_log(tenant, run_id), after_seq)

    def _replay(self, commits: list[StoredCommit], tenant: str, run_id: str,
                handle: RunHandle | None = None) -> RunHandle | None:
        """Apply commits in order; onto ``handle`` in place when given (skipping commits it has:
        a consumer may have brought it forward while the read was in flight). A commit the
        authenticity check refuses, or that does not continue the run, is skipped: it changes
        no state, but the run's position moves past it (the next append follows it)."""
        if handle is not None:
            commits = [c for c in commits if c.stream_seq > handle.stream_seq]
        subject = s.run_events(tenant, run_id)
        run = handle.run if handle else None
        last_hash = handle.last_hash if handle else ev.GENESIS_HASH
        stream_seq = handle.stream_seq if handle else 0
        auth = self.authenticity
        for commit in commits:
            stream_seq = commit.stream_seq
            if auth.check(subject, commit, run_id, tenant) is not None:
                continue
            first = commit.envelopes[0]
            expected = (run.version + 1) if run is not None else 1
            if first.get("seq") != expected or first.get("prev_hash") != last_hash:
                if handle is not None:  # the cached copy may be what is behind: the caller replays afresh
                    raise ChainBroken(f"run {run_id}: the commit at stream seq {commit.stream_seq} does not follow "
                                      f"the cached state (seq {expected - 1})")
                # from the start of the log: the commit itself does not continue the run (a fork)
                auth.report(Refusal(
                    subject, commit.stream_seq, BROKEN_LINK,
                    f"starts at seq {first.get('seq')} after hash {str(first.get('prev_hash'))[:12]}…, the run is "
                    f"at seq {expected - 1} with head hash {last_hash[:12]}…",
                    first.get("seq") if isinstance(first.get("seq"), int) else None), commit)
                continue
            try:
                for envelope in commit.envelopes:
                    if run is None:
                        run = codec.event_from_envelope(envelope).mutate(None)
                    else:
                        codec.apply_envelope(run, envelope)
            except Exception as e:
                # signed by a trusted writer yet not applicable (an unknown type, invalid data):
                # the state may be half-changed, so the whole replay must not be used
                raise ChainBroken(f"run {run_id}: commit at stream seq {commit.stream_seq} cannot be applied: "
                                  f"{e}") from e
            last_hash = commit.envelopes[-1]["hash"]
        if run is None:
            return None
        if handle is not None:
            handle.stream_seq, handle.last_hash = stream_seq, last_hash
            return handle
        return RunHandle(run=run, tenant=tenant, stream_seq=stream_seq, last_hash=last_hash)

    async def load(self, tenant: str, run_id: str, *, fresh: bool = False) -> RunHandle:
        """The run from cache when present (it may lag; appends detect that), else by replay."""
        key = (tenant, run_id)
        handle = self._cache.get(key)
        if handle is not None and not fresh and handle.stream_seq >= self._seen.get(key, 0):
            self._cache.move_to_end(key)
            self.stats["cache_hits"] += 1
            return handle
        self.stats["loads"] += 1
        try:
            return await self._load(key, handle)
        except BaseException:
            self._cache.pop(key, None)  # a half-applied copy must never be used
            raise

    async def read_checked(self, tenant: str, run_id: str, after_seq: int = 0) -> list[StoredCommit]:
        """:meth:`read_commits`, with every signer the trust does not know yet looked up first."""
        commits = await self.read_commits(tenant, run_id, after_seq)
        await self.prepare(commits)
        return commits

    async def prepare(self, commits: Sequence[StoredCommit]) -> None:
        """Let the trust look up signers it does not know yet (a key issued a moment ago)."""
        prepare = getattr(self.authenticity.trust, "prepare", None)
        if prepare is not None:
            signers = {c.signer for c in commits if c.signer}
            if signers:
                await prepare(signers)

    async def _load(self, key: tuple[str, str], handle: RunHandle | None) -> RunHandle:
        tenant, run_id = key
        if handle is not None:  # bring the cached copy forward
            commits = await self.read_checked(tenant, run_id, handle.stream_seq)
            try:
                handle = self._replay(commits, tenant, run_id, handle) if commits else handle
            except ChainBroken:
                self._cache.pop(key, None)
                handle = None
        if handle is None:
            handle = self._replay(await self.read_checked(tenant, run_id), tenant, run_id)
        if handle is None:
            raise RunNotFound(tenant, run_id)
        # a commit delivered while the read was in flight (observe found no cached run to bring
        # forward) must not be missed: a decision on the older state could find nothing to do
        for _ in range(50):
            if handle.stream_seq >= self._seen.get(key, 0):
                break
            commits = await self.read_checked(tenant, run_id, handle.stream_seq)
            if commits:
                handle = self._replay(commits, tenant, run_id, handle) or handle
            else:  # a replica serving direct gets may lag a moment
                await asyncio.sleep(0.01)
        self._remember(handle)
        return handle

    async def exists(self, tenant: str, run_id: str) -> bool:
        """Whether the run has any stored commit (loading it into the cache if so)."""
        try:
            await self.load(tenant, run_id)
        except RunNotFound:
            return False
        return True

    def _remember(self, handle: RunHandle) -> None:
        key = (handle.tenant, handle.run_id)
        if handle.run.terminal:  # finished runs rarely need more work: keep memory for live ones
            self._cache.pop(key, None)
            return
        self._cache[key] = handle
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _restore(self, handle: RunHandle) -> None:
        """Cache again a copy an update detached and left unchanged, unless a newer one is there."""
        if (handle.tenant, handle.run_id) not in self._cache:
            self._remember(handle)

    def cached(self, tenant: str, run_id: str) -> bool:
        """Whether a copy of the run is in the cache."""
        return (tenant, run_id) in self._cache

    def cached_lane(self, tenant: str, run_id: str) -> str | None:
        """The lane of a cached run's commits (#16), None when it is not cached (no I/O)."""
        handle = self._cache.get((tenant, run_id))
        return handle.run.lane if handle is not None else None

    def forget(self, tenant: str, run_id: str) -> None:
        """Drop the cached copy of a run: the next load replays it."""
        self._cache.pop((tenant, run_id), None)

    def observe(self, tenant: str, run_id: str, stream_seq: int, payload: bytes | StoredCommit, *,
                adopt: bool = False) -> None:
        """Bring a cached run forward with a commit a consumer delivered (no I/O).

        A commit that does not follow the cached state directly (another copy of the service
        took the one in between) drops the cached run; the next load replays. ``adopt``: a run's
        first commit (its signers looked up: :meth:`prepare`) starts a cached copy, so the run's
        next load reads nothing.
        """
        key = (tenant, run_id)
        if stream_seq > self._seen.get(key, 0):
            self._seen[key] = stream_seq
            self._seen.move_to_end(key)
            while len(self._seen) > 4 * self.cache_size:
                self._seen.popitem(last=False)
        handle = self._cache.get(key)
        if handle is None and adopt and isinstance(payload, StoredCommit) and payload.envelopes \
                and payload.envelopes[0].get("seq") == 1:
            try:
                started = self._replay([payload], tenant, run_id)
            except Exception:
                return  # the next load replays from the log
            if started is not None:
                self._remember(started)
            return
        if handle is None or stream_seq <= handle.stream_seq:
            return
        try:
            commit = payload if isinstance(payload, StoredCommit) else stored_commit(stream_seq, payload, None)
            # refused: the next load replays from the log (a commit another copy of the service
            # was delivered may lie between, so the position cannot simply move past this one)
            if self.authenticity.check(s.run_events(tenant, run_id), commit, run_id, tenant) is not None:
                raise ChainBroken("refused")
            if commit.envelopes[0].get("seq") != handle.version + 1:
                raise ChainBroken("gap")
            self._replay([commit], tenant, run_id, handle)
            if handle.run.terminal:
                self._cache.pop(key, None)
        except Exception:
            # the handle may be half-applied: drop it and replay on the next load
            self._cache.pop(key, None)

    # -- writing -----------------------------------------------------------------------------
    def _lock(self, tenant: str, run_id: str) -> asyncio.Lock:
        key = (tenant, run_id)
        lock = self._locks.get(key)
        if lock is None:
            if len(self._locks) > 4 * self.cache_size:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def start_run(self, run_id: UUID, data: ev.RunStarted, then: Decide | None = None) -> RunHandle:
        """Append a run's first event (and what ``then`` adds, in the same commit).

        Raises :class:`RunExists` if the run already exists.
        """
        tenant, rid = data.tenant, str(run_id)
        async with self._lock(tenant, rid):
            run = Run.start(run_id, data)
            if then is not None:
                outcome = then(run)
                if outcome is not None:
                    await outcome
            blank = RunHandle(run=run, tenant=tenant, stream_seq=0, last_hash=ev.GENESIS_HASH)
            try:
                handle, _ = await self._append(blank, run.collect_events())
                return handle
            except Conflict:
                handle = await self.load(tenant, rid, fresh=True)
                raise RunExists(handle) from None

    async def update(self, tenant: str, run_id: str, decide: Decide, *, attempts: int = 50, fresh: bool = False
                     ) -> tuple[RunHandle, list[dict[str, Any]]]:
        """Load the run, let ``decide`` call commands on it, append what they produced.

        On a conflict the run is reloaded and ``decide`` runs again on the new state, so it must
        decide from the state it is given (and may decide that nothing is left to do). A decide
        that raises :class:`StaleState` (its input is ahead of the cached run) gets the run read
        forward to the log's end and runs again; ``fresh=True`` does that from the start.

        Updates of one run that wait while another is appending are applied together and
        appended as one commit (group commit): a burst of results for a 500-way fan-out is a
        handful of appends, not 500 conflicting ones.
        Returns the new handle and the appended envelopes (empty when nothing was decided).
        """
        if self.checkpoint is not None:
            await self.checkpoint()
        key = (tenant, run_id)
        mine = _Pending(decide, fresh, asyncio.get_running_loop().create_future())
        self._pending.setdefault(key, []).append(mine)
        async with self._lock(tenant, run_id):
            if not mine.future.done():
                group = self._pending.pop(key, [])
                try:
                    if len(group) > 1:
                        self.stats["grouped"] += len(group) - 1
                    await self._apply_group(tenant, run_id, group, attempts)
                finally:
                    for p in group:  # interrupted (cancelled): the others must not wait forever
                        if not p.future.done():
                            p.future.set_exception(EventStoreError(f"update of run {run_id} was interrupted"))
        return mine.future.result()

    async def _apply_group(self, tenant: str, run_id: str, group: list[_Pending], attempts: int) -> None:
        fresh = any(p.fresh for p in group)
        stale_retried = False
        key = (tenant, run_id)
        for attempt in range(attempts):
            handle = await self.load(tenant, run_id, fresh=fresh)
            # the decide has the run to itself while it runs: a consumer's observe() or another
            # task's load() brings the *cached* copy forward in place, and a decide that awaits
            # (the dispatcher's gate round trip, #16) would then act on a state that changed under
            # it, its append still succeeding (the handle's position moved too). Detached, such a
            # commit makes the append conflict, and the decide runs again on the new state.
            if self._cache.get(key) is handle:
                del self._cache[key]
            try:
                for p in group:
                    outcome = p.decide(handle.run)
                    if outcome is not None:
                        await outcome
            except StaleState as stale:
                handle.run.collect_events()
                self.forget(tenant, run_id)
                if len(group) > 1:  # find out whose input it is, one at a time
                    return await self._apply_each(tenant, run_id, group, attempts)
                if stale_retried:  # still ahead of the whole log: the input is wrong, not us
                    group[0].future.set_exception(stale)
                    return
                stale_retried, fresh = True, True
                continue
            except Exception as e:
                # the aggregate may be half-changed (commands were called), or a refusal may
                # come from a cached copy that lags: replay next time. A failure before any
                # command (an unknown workflow, a lost connection) leaves it as it was.
                if handle.run.collect_events() or isinstance(e, IllegalTransition):
                    self.forget(tenant, run_id)
                else:
                    self._restore(handle)
                if len(group) > 1:  # one decide failed: the others must not fail with it
                    return await self._apply_each(tenant, run_id, group, attempts)
                group[0].future.set_exception(e)
                return
            except BaseException:  # cancelled: nothing half-done may stay cached
                self.forget(tenant, run_id)
                raise
            new_events = handle.run.collect_events()
            if not new_events:
                self._restore(handle)
                for p in group:
                    p.future.set_result((handle, []))
                return
            try:
                result = await self._append(handle, new_events)
            except Conflict:
                self.stats["conflicts"] += 1
                self.forget(tenant, run_id)
                fresh = True
                await asyncio.sleep(spread(CONFLICT_BACKOFF.delay(attempt), run_id))
                continue
            except BaseException:
                # the cached run holds events that may not be stored: never append after them
                self.forget(tenant, run_id)
                raise
            for p in group:
                p.future.set_result(result)
            return
        error = TooManyConflicts(f"run {run_id}: gave up after {attempts} conflicting appends")
        for p in group:
            p.future.set_exception(error)

    async def _apply_each(self, tenant: str, run_id: str, group: list[_Pending], attempts: int) -> None:
        for p in group:
            if not p.future.done():
                await self._apply_group(tenant, run_id, [p], attempts)

    async def _append(self, handle: RunHandle, new_events: Sequence[Any]
                      ) -> tuple[RunHandle, list[dict[str, Any]]]:
        """Chain ``new_events`` onto ``handle`` and append them (in chunks of MAX_COMMIT_EVENTS)."""
        tenant, run_id = handle.tenant, handle.run_id
        subject = s.run_events(tenant, run_id)
        prev = handle.last_hash
        envelopes: list[dict[str, Any]] = []
        for event in new_events:
            envelope = codec.envelope_from_event(event, tenant=tenant, service=self.service, prev_hash=prev)
            envelopes.append(envelope)
            prev = envelope["hash"]
        stream_seq = handle.stream_seq
        for start in range(0, len(envelopes), MAX_COMMIT_EVENTS):
            chunk = envelopes[start:start + MAX_COMMIT_EVENTS]
            payload = codec.encode_commit(run_id, tenant, chunk)
            msg_id = f"{run_id}@{chunk[0]['seq']}:{chunk[-1]['hash'][:16]}"
            signed = self.authenticity.headers(subject, chunk)
            # below the run's log, named for who wrote it, who must act on it and the run's lane:
            # each service's consumer gets only the commits it needs (contracts.routing)
            where = s.commit_subject(tenant, run_id, self.writer, routing.route_of(chunk, self.writer),
                                     handle.run.lane)
            stream_seq = await self.recorder.append(where, payload, msg_id, stream_seq, signed,
                                                    condition_on=s.run_log(tenant, run_id))
            self.stats["appends"] += 1
        new_handle = RunHandle(run=handle.run, tenant=tenant, stream_seq=stream_seq, last_hash=prev)
        self._remember(new_handle)
        return new_handle, envelopes


@dataclass
class _Pending:
    decide: Decide
    fresh: bool
    future: asyncio.Future[tuple[RunHandle, list[dict[str, Any]]]]


__all__ = ["Decide", "EventStore", "RunHandle"]
