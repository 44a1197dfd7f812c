"""The dispatch gate's durable state: limits in the gate bucket, changed with compare-and-set,
and queue depth per topic read from the jobs stream (backpressure).

The decisions are :mod:`interlock.dispatcher.gate` (pure); this module reads a limit's
:class:`GateScope`, lets a decision change it and writes it back only if nobody changed it
meanwhile (the entry's revision), so every dispatcher copy sees and keeps the same counts. A
copy that is killed after taking a slot and before recording its StepDispatched leaves a holder
behind; the dispatcher's sweep gives back the slots of jobs that are not in flight
(:meth:`Gatekeeper.holders`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_OP, KeyValue

from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.contracts.messages import GateQueued, GateScope, GateWaiter
from interlock.core.eventstore import EventStoreError
from interlock.core.workload import GateLimits
from interlock.dispatcher import gate, ledger
from interlock.dispatcher.gate import Hold, Limit
from interlock.runtime import metrics
from interlock.runtime.kvkeys import matching_keys

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 40
QUEUE_POLL_S = 1.0
WATCH_START_S = 30.0  # loading the waiting jobs at start-up
WATCH_RETRY_S = 2.0  # a watch that could not start is tried again this often
CATCH_UP_S = 0.5  # a copy that freed a slot waits at most this long to know every waiter queued before

R = TypeVar("R")
Decided = tuple[Hold | None, list[tuple[str, GateWaiter]]]  # an admission: why it waits, who may go instead


class WaitIndex:
    """Every job waiting at every limit, from the gate bucket's waiter entries (:class:`GateQueued`),
    kept current by a watch of the whole bucket; this copy's own writes apply at once.

    ``seen``: the last bucket revision the watch delivered (in stream order, so every earlier
    write was delivered too). :meth:`complete_below` tells whether every write before a revision
    is known here (delivered, or this copy's own): a copy that freed a slot ranks the queue only
    then, so a job another copy queued just before is never missed (its wake is not lost)."""

    def __init__(self) -> None:
        self.by_limit: dict[str, dict[str, GateWaiter]] = {}
        self.orders: dict[str, gate.WaitOrder] = {}  # the same jobs per limit, in ranking order
        self._jobs: dict[str, tuple[str, str]] = {}  # waiter key -> (limit key, job id)
        self._applied: dict[str, int] = {}  # waiter key -> the revision its state here is from
        self._own: set[int] = set()  # revisions this copy wrote that the watch has not delivered yet
        self.seen = 0
        self._moved = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None
        self.ready = asyncio.Event()

    async def start(self, kv: KeyValue) -> None:
        self._watcher = await kv.watch(">")
        self._task = asyncio.create_task(self._follow(), name="gate-wait-index")
        try:
            await asyncio.wait_for(self.ready.wait(), WATCH_START_S)
        except TimeoutError:  # it keeps following: the queues fill in as the entries arrive
            log.warning("gate: the waiting jobs did not load within %ss; following them meanwhile", WATCH_START_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()

    async def _follow(self) -> None:
        async for entry in self._watcher:
            if entry is None:  # the bucket's current entries are all in
                self.ready.set()
                continue
            self._delivered(entry.key, entry.revision, entry.value, entry.operation is not None)

    def _delivered(self, key: str, revision: int, value: bytes | None, deleted: bool) -> None:
        self.seen = max(self.seen, revision)
        self._own = {r for r in self._own if r > self.seen}
        self._moved.set()
        self._moved = asyncio.Event()
        if s.is_gate_waiter_key(key) and revision > self._applied.get(key, 0):
            self._apply(key, revision, None if deleted or not value else value)

    def _apply(self, key: str, revision: int, value: bytes | GateQueued | None) -> None:
        self._applied[key] = revision
        if value is None:
            limit, job = self._jobs.pop(key, ("", ""))
            jobs = self.by_limit.get(limit)
            if jobs is not None:
                jobs.pop(job, None)
                self.orders[limit].discard(job)
                if not jobs:
                    del self.by_limit[limit]
                    del self.orders[limit]
            return
        try:
            queued = value if isinstance(value, GateQueued) else GateQueued.model_validate_json(value)
        except ValueError:
            log.warning("gate: waiter entry %s is not a GateQueued; ignored", key)
            return
        self._jobs[key] = (queued.limit, queued.job)
        self.by_limit.setdefault(queued.limit, {})[queued.job] = queued.waiter
        self.orders.setdefault(queued.limit, gate.WaitOrder()).add(queued.job, queued.waiter)

    def wrote(self, key: str, revision: int, queued: GateQueued | None) -> None:
        """This copy wrote ``key`` (a waiter entry, ``queued`` None for a delete) at ``revision``."""
        self.own(revision)
        if revision > self._applied.get(key, 0):
            self._apply(key, revision, queued)

    def own(self, revision: int) -> None:
        """This copy wrote ``revision`` (any entry of the bucket)."""
        if revision > self.seen:
            self._own.add(revision)

    def waiting(self, limit: str) -> dict[str, GateWaiter]:
        return self.by_limit.get(limit, {})

    def order(self, limit: str) -> gate.WaitOrder | None:
        """The limit's waiting jobs in ranking order (None: nobody waits there)."""
        return self.orders.get(limit)

    def complete_below(self, revision: int) -> bool:
        return all(r in self._own for r in range(self.seen + 1, revision))

    async def caught_up(self, revision: int, patience: float = CATCH_UP_S) -> bool:
        """Wait until every write before ``revision`` is known here (at most ``patience`` s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while not self.complete_below(revision):
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), left)
        return True


class Gatekeeper:
    """Slots and tokens of the limits, shared by every dispatcher copy through the gate bucket.

    A limit's state (:class:`GateScope`: holders, shares, tokens) is one entry changed with
    compare-and-set; each waiting job is an entry of its own (:class:`GateQueued`), which
    :class:`WaitIndex` keeps in memory here. A decision sees the two together (:meth:`view`)
    and the pure rules in :mod:`interlock.dispatcher.gate` are unchanged; what it changed is
    written as: new waiters' entries, then the state (compare-and-set), then removed waiters'
    entries. So the state entry stays small, and a change costs the same with 1 or 1,000 jobs
    waiting. A job that waits without changing the state checks the state's revision afterwards
    (it decided on what is still there, or it decides again); a copy that freed a slot ranks the
    queue once it knows every waiter written before its change (:meth:`WaitIndex.caught_up`).
    A waiter entry left behind by a killed copy is dropped by the wake or the sweep (the run's
    log shows it no longer waits)."""

    def __init__(self, js: JetStreamContext, config: GateLimits) -> None:
        self.js = js
        self.config = config
        self._kv: KeyValue | None = None
        self._rng = random.Random()
        self._pending: dict[str, list[tuple[Callable[[GateScope], tuple[GateScope, Any]], asyncio.Future[Any]]]] = {}
        self._flushing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # the last state this process wrote or read per key, with its revision: a write goes out
        # against it at once (compare-and-set catches a stale one), saving a read on the hot path
        self._cache: dict[str, tuple[GateScope, int | None]] = {}
        self.index = WaitIndex()
        self._retry: asyncio.Task[None] | None = None
        self.stats: Counter[str] = Counter()  # changes asked for, writes, conflicts
        # waiting jobs of a limit that may go now: the dispatcher wakes their runs (set by it)
        self.on_free: Callable[[Limit, list[tuple[str, GateWaiter]]], None] = lambda limit, woken: None

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(s.GATE_BUCKET)
        return self._kv

    async def start(self) -> None:
        """Load the waiting jobs and follow their entries (before the first decision). A bucket not
        reachable yet (a leader election, a bucket still being provisioned) is tried again in the
        background; until then decisions see only this copy's own waiting jobs."""
        try:
            await self.index.start(await self.bucket())
        except Exception as e:
            log.warning("gate: cannot follow the waiting jobs yet (%r); trying again in the background", e)
            self._kv = None
            self._retry = asyncio.create_task(self._start_later(), name="gate-wait-index-start")

    async def _start_later(self) -> None:
        while True:
            await asyncio.sleep(WATCH_RETRY_S)
            try:
                await self.index.start(await self.bucket())
                log.info("gate: following the waiting jobs")
                return
            except Exception as e:
                self._kv = None
                log.warning("gate: still cannot follow the waiting jobs: %r", e)

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        await self.index.stop()

    async def read(self, key: str) -> tuple[GateScope, int | None]:
        """A limit's stored state (with the waiting jobs of an entry written before they had their own)."""
        kv = await self.bucket()
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return GateScope(), None
        return GateScope.model_validate_json(entry.value or b"{}"), entry.revision

    def _view(self, key: str, state: GateScope) -> GateScope:
        """The state with the limit's waiting jobs (a job holding a slot already is not waiting)."""
        waiting = {**self.index.waiting(key), **state.waiting}
        for job in state.holders.keys() & waiting.keys():
            del waiting[job]
        return state.model_copy(update={"waiting": waiting})

    async def view(self, key: str) -> GateScope:
        """The limit's current state and queue, read now."""
        state, _ = await self.read(key)
        return self._view(key, state)

    async def change(self, key: str, decide: Callable[[GateScope], tuple[GateScope, R]]) -> R:
        """Apply ``decide`` to the limit's current state (with its queue) and write what changed:
        the state with compare-and-set on the entry's revision (retried when another copy wrote
        first), the waiting jobs' own entries.

        Changes of one key that arrive while a write is out are applied together, in order, and
        written once (group commit): the key's throughput is a batch per round trip, not one change."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((decide, future))
        self.stats["changes"] += 1
        if key not in self._flushing:
            self._flushing.add(key)
            task = asyncio.create_task(self._flush(key), name=f"gate-{key}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        result: R = await future
        return result

    async def _flush(self, key: str) -> None:
        try:
            while batch := self._pending.pop(key, None):
                try:
                    await self._apply(key, batch)
                except Exception as e:  # every change of the batch fails with it (the caller retries)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
        finally:
            self._flushing.discard(key)

    async def _write_waiters(self, key: str, before: GateScope, after: GateScope, stored: GateScope,
                             *, added: bool) -> None:
        """Put the entries of jobs waiting in ``after`` only (``added``), or delete those of jobs
        waiting in ``before`` only; jobs of a state entry written before waiters had entries of
        their own (``stored.waiting``) get theirs."""
        kv = await self.bucket()

        async def put(job: str) -> None:
            queued = GateQueued(job=job, limit=key, waiter=after.waiting[job])
            wkey = s.gate_waiter_key(key, job)
            self.index.wrote(wkey, await kv.put(wkey, queued.model_dump_json().encode()), queued)

        async def delete(job: str) -> None:
            wkey = s.gate_waiter_key(key, job)
            # a delete marker, published directly: its revision tells the index what it already knows
            ack = await self.js.publish(p.kv_key(s.GATE_BUCKET, wkey), headers={KV_OP: KV_DEL})
            self.index.wrote(wkey, ack.seq, None)

        if added:
            await asyncio.gather(*(put(j) for j in after.waiting if j not in before.waiting or j in stored.waiting))
            return
        mine = dict(self.index.waiting(key))  # jobs with an entry of their own
        await asyncio.gather(*(delete(j) for j in before.waiting
                               if j not in after.waiting and (j in mine or j in stored.waiting)))

    async def _apply(self, key: str, batch: list[tuple[Callable[[GateScope], tuple[GateScope, Any]],
                                                       asyncio.Future[Any]]]) -> None:
        kv = await self.bucket()
        fresh = False
        for attempt in range(CAS_ATTEMPTS):
            cached = None if fresh else self._cache.pop(key, None)
            stored, revision = cached if cached is not None else await self.read(key)
            fresh = cached is None
            state = self._view(key, stored)
            new, results = state, []
            for decide, _ in batch:
                new, result = decide(new)
                results.append(result)
            if new == state and not fresh:
                fresh = True  # decided on a state another copy may have changed meanwhile: read it
                continue
            doc = new.model_copy(update={"waiting": {}})
            changed = doc != stored.model_copy(update={"waiting": {}}) or bool(stored.waiting)
            await self._write_waiters(key, state, new, stored, added=True)
            if changed:
                data = doc.model_dump_json(exclude_none=True).encode()
                try:
                    if revision is None:
                        revision = await kv.create(key, data)
                    else:
                        revision = await kv.update(key, data, last=revision)
                except KeyWrongLastSequenceError:
                    self.stats["conflicts"] += 1
                    fresh = True
                    await asyncio.sleep(self._rng.random() * 0.002 * (attempt + 1))
                    continue
                self.index.own(revision)
                self.stats["writes"] += 1
            elif new != state and not fresh:
                # only waiters changed: the state they were judged on must still be the stored one
                _, now_revision = await self.read(key)
                if now_revision != revision:
                    fresh = True
                    continue
            self._cache[key] = (doc, revision)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
            # the entries of jobs that stopped waiting go after the decision is out, not holding up
            # the key's next batch: meanwhile a job that took a slot is a holder, not ranked as
            # waiting (_view); one whose delete is lost is dropped by its wake or the sweep
            self._spawn(self._forget_waiters(key, state, new, stored))
            return
        raise EventStoreError(f"gate limit {key} changed by others {CAS_ATTEMPTS} times in a row")

    async def _forget_waiters(self, key: str, before: GateScope, after: GateScope, stored: GateScope) -> None:
        try:
            await self._write_waiters(key, before, after, stored, added=False)
        except Exception as e:  # a reconnect: the wake or the sweep drops what is left
            log.warning("gate %s: could not delete the entries of jobs that stopped waiting: %r", key, e)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _up_to_date(self, limit: Limit, decided: list[tuple[str, GateWaiter]]) -> list[tuple[str, GateWaiter]]:
        """The waiting jobs that may go now after this copy freed a slot: as decided when every
        waiter written before the change was known here, else once they are (read again)."""
        _, revision = self._cache.get(limit.key, (None, None))
        if revision is None or self.index.complete_below(revision):
            return decided
        self.stats["catch_ups"] += 1
        await self.index.caught_up(revision)
        state, _ = self._cache.get(limit.key, (GateScope(), None))
        return list(dict([*decided, *gate.next_up(self._view(limit.key, state), limit, self.config.weight,
                                                   time.time(), self.index.order(limit.key))]).items())

    # -- a job passing, waiting, finishing ------------------------------------------------------
    async def admit(self, job: str, waiter: GateWaiter, limits: Sequence[Limit]) -> Hold | None:
        """Take a slot (or token) of every limit for ``job``, or return why it waits; a job held
        by a later limit gives back the slots it took at earlier ones, and waits at that one."""
        taken: list[Limit] = []
        for limit in limits:
            def decide(state: GateScope, limit: Limit = limit) -> tuple[GateScope, Decided]:
                now = time.time()
                order = self.index.order(limit.key)
                if gate.may_go(state, limit, job, waiter, self.config.weight, now, order):
                    return gate.take(state, limit, job, waiter, now, self.config.weight), (None, [])
                new = gate.wait(state, job, waiter)
                retry_in = None
                if limit.kind == "rate":
                    retry_in = gate.next_token_in(new, limit, now, gate.place_of(new, job, self.config.weight, order))
                # held behind jobs that may go now (a slot is free): their wake may have been lost
                # with a killed copy, so they are woken again rather than left to the sweep
                ahead = gate.next_up(new, limit, self.config.weight, now, order) if limit.kind == "concurrency" else []
                return new, (Hold(limit.name, limit.describe(), retry_in), ahead)

            hold, ahead = await self.change(limit.key, decide)
            if ahead:
                self.on_free(limit, ahead)
            if hold is not None:
                await self.release(job, [t for t in taken if t.kind == "concurrency"])
                return hold
            taken.append(limit)
        return None

    async def release(self, job: str, limits: Sequence[Limit], *,
                      entry: tuple[bool, float] | None = None) -> list[tuple[str, GateWaiter]]:
        """Give back ``job``'s slots (or its place in a queue; with ``entry``, holding and when it
        was taken, only that entry and only if it is unchanged: a judgement on an older read);
        returns the waiting jobs that may go now, in order, whose runs :attr:`on_free` wakes."""
        woken: list[tuple[str, GateWaiter]] = []
        for limit in limits:
            def decide(state: GateScope, limit: Limit = limit) -> tuple[GateScope, list[tuple[str, GateWaiter]]]:
                new = gate.release(state, job) if entry is None else ledger.drop_entry(state, job, *entry)[0]
                return new, gate.next_up(new, limit, self.config.weight, time.time(), self.index.order(limit.key))

            up = await self._up_to_date(limit, await self.change(limit.key, decide))
            if up:
                self.on_free(limit, up)
            woken += up
        return list(dict(woken).items())

    async def keys(self) -> list[str]:
        """The keys of the limits' states (not the waiting jobs' entries)."""
        return [k for k in await matching_keys(await self.bucket()) if not s.is_gate_waiter_key(k)]


class QueueDepth:
    """Jobs queued per tenant's topic (published and not yet finished: the jobs stream is a work
    queue a worker acks once its result is durable), read from the stream every second: the
    backpressure bound, ``interlock agents`` and the ``interlock.queue.depth`` metric.

    Between two reads this copy counts the jobs it let through itself, so a burst cannot overshoot
    the bound by more than what other copies let through in one poll."""

    def __init__(self, js: JetStreamContext, bound: int, wake: Callable[[list[tuple[str, str]]], None]) -> None:
        self.js = js
        self.bound = bound
        self._wake = wake
        self.depth: dict[str, int] = {}  # job subject -> messages
        self._since: dict[str, int] = {}  # job subject -> published by this copy since the last read
        self._held: dict[str, dict[tuple[str, str], int]] = {}  # subject -> (tenant, run id) -> priority
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.bound > 0 or metrics.enabled():
            self._task = asyncio.create_task(self._poll(), name="dispatcher-queue-depth")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def full(self, tenant: str, topic: str) -> bool:
        subject = s.job(tenant, topic)
        return self.bound > 0 and self.depth.get(subject, 0) + self._since.get(subject, 0) >= self.bound

    def published(self, tenant: str, topic: str) -> None:
        subject = s.job(tenant, topic)
        self._since[subject] = self._since.get(subject, 0) + 1

    def hold(self, tenant: str, topic: str, run_id: str, priority: int) -> Hold:
        self._held.setdefault(s.job(tenant, topic), {})[(tenant, run_id)] = priority
        return Hold("backpressure", f"{self.bound} job(s) of topic {topic} are queued already (the backpressure "
                                    "bound, max_in_flight)")

    async def read(self) -> None:
        info = await self.js.stream_info(s.JOBS_STREAM, subjects_filter=s.JOBS_ALL)
        gone = set(self.depth)
        self.depth = dict(info.state.subjects or {})
        self._since.clear()
        for subject in gone | set(self.depth):  # a topic whose queue emptied reports 0, not its last depth
            try:
                metrics.gauges.queue_depth[s.parse_job(subject)] = self.depth.get(subject, 0)
            except ValueError:
                continue
        for subject, held in list(self._held.items()):
            free = self.bound - self.depth.get(subject, 0)
            if free <= 0 or not held:
                continue
            first = sorted(held, key=lambda k: -held[k])[:free]
            for key in first:
                held.pop(key, None)
            self._wake(first)

    async def _poll(self) -> None:
        while True:
            try:
                await self.read()
            except Exception as e:  # an election, a reconnect: next time
                log.debug("dispatcher: jobs stream info failed: %r", e)
            await asyncio.sleep(QUEUE_POLL_S)
