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
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from interlock.contracts import subjects as s
from interlock.contracts.messages import GateScope, GateWaiter
from interlock.core.eventstore import EventStoreError
from interlock.core.workload import GateLimits
from interlock.dispatcher import gate, ledger
from interlock.dispatcher.gate import Hold, Limit
from interlock.runtime import metrics

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 40
QUEUE_POLL_S = 1.0

R = TypeVar("R")
Decided = tuple[Hold | None, list[tuple[str, GateWaiter]]]  # an admission: why it waits, who may go instead


class Gatekeeper:
    """Slots and tokens of the limits, shared by every dispatcher copy through the gate bucket."""

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
        self.stats: Counter[str] = Counter()  # changes asked for, writes, conflicts
        # waiting jobs of a limit that may go now: the dispatcher wakes their runs (set by it)
        self.on_free: Callable[[Limit, list[tuple[str, GateWaiter]]], None] = lambda limit, woken: None

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(s.GATE_BUCKET)
        return self._kv

    async def read(self, key: str) -> tuple[GateScope, int | None]:
        kv = await self.bucket()
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return GateScope(), None
        return GateScope.model_validate_json(entry.value or b"{}"), entry.revision

    async def change(self, key: str, decide: Callable[[GateScope], tuple[GateScope, R]]) -> R:
        """Apply ``decide`` to the limit's current state and write the result if it changed,
        compare-and-set on the entry's revision (retried when another copy wrote first).

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

    async def _apply(self, key: str, batch: list[tuple[Callable[[GateScope], tuple[GateScope, Any]],
                                                       asyncio.Future[Any]]]) -> None:
        kv = await self.bucket()
        fresh = False
        for attempt in range(CAS_ATTEMPTS):
            cached = None if fresh else self._cache.pop(key, None)
            state, revision = cached if cached is not None else await self.read(key)
            fresh = cached is None
            new, results = state, []
            for decide, _ in batch:
                new, result = decide(new)
                results.append(result)
            if new == state and not fresh:
                fresh = True  # decided on a state another copy may have changed meanwhile: read it
                continue
            if new != state:
                data = new.model_dump_json(exclude_none=True).encode()
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
                self.stats["writes"] += 1
            self._cache[key] = (new, revision)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
            return
        raise EventStoreError(f"gate limit {key} changed by others {CAS_ATTEMPTS} times in a row")

    # -- a job passing, waiting, finishing ------------------------------------------------------
    async def admit(self, job: str, waiter: GateWaiter, limits: Sequence[Limit]) -> Hold | None:
        """Take a slot (or token) of every limit for ``job``, or return why it waits; a job held
        by a later limit gives back the slots it took at earlier ones, and waits at that one."""
        taken: list[Limit] = []
        for limit in limits:
            def decide(state: GateScope, limit: Limit = limit) -> tuple[GateScope, Decided]:
                now = time.time()
                if gate.may_go(state, limit, job, waiter, self.config.weight, now):
                    return gate.take(state, limit, job, waiter, now, self.config.weight), (None, [])
                new = gate.wait(state, job, waiter)
                retry_in = None
                if limit.kind == "rate":
                    retry_in = gate.next_token_in(new, limit, now, gate.place_of(new, job, self.config.weight))
                # held behind jobs that may go now (a slot is free): their wake may have been lost
                # with a killed copy, so they are woken again rather than left to the sweep
                ahead = gate.next_up(new, limit, self.config.weight, now) if limit.kind == "concurrency" else []
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
                return new, gate.next_up(new, limit, self.config.weight, time.time())

            up = await self.change(limit.key, decide)
            if up:
                self.on_free(limit, up)
            woken += up
        return list(dict(woken).items())

    async def keys(self) -> list[str]:
        try:
            kv = await self.bucket()
            return list(await kv.keys())
        except Exception:  # nats-py raises NoKeysError (or a timeout on an empty bucket): none
            return []


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
