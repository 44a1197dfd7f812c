"""A durable JetStream pull consumer that hands each message on the moment it arrives.

Why not ``fetch()``: a batch fetch waits for its batch to fill (or its timeout) before returning,
which puts up to the timeout on every hop of a run. Here one pull request for a batch stays open
on the server, which pushes each message to us as soon as it exists (the way the Go and JS
clients' ``consume()`` works); a new request goes out when the previous one is used up or
expires. Handlers run concurrently, bounded; each acks its own message.

While a handler works on a message, the consumer sends a progress ack for it every
``timing.PROGRESS_INTERVAL_S``, so the short ack wait (``timing.ACK_WAIT_S``) never takes work
from a live holder, and work held by a killed process is redelivered to another copy within it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, Header
from nats.js.errors import BadRequestError, ServiceUnavailableError

from interlock.contracts import subjects as s
from interlock.contracts import timing
from interlock.core.retry import Backoff, retrying

log = logging.getLogger(__name__)

REQUEST_EXPIRES_S = 5.0
IDLE_HEARTBEAT_S = 1.0
LOST_REQUEST_S = 2.5 * IDLE_HEARTBEAT_S  # silence after which an open pull request counts as lost
# creating the consumer rides through a leader election at start-up (~5 s in a cluster)
CREATE_BACKOFF = Backoff(first=0.2, cap=2.0)
# a handler that raises leaves its message to be redelivered (a passing fault); this many times at most
MAX_UNHANDLED_DELIVERIES = 10
_STATUS = Header.STATUS.value  # set on the server's status messages (no data): 100, 404, 408, 409


class PullConsumer:
    """One durable consumer of ``subject`` on ``stream``; ``handler`` gets each message (and acks it)."""

    def __init__(self, nc: NATS, js: JetStreamContext, *, stream: str, durable: str, subject: str | Sequence[str],
                 handler: Callable[[Msg], Awaitable[None]], concurrency: int = 64,
                 ack_wait: float = timing.ACK_WAIT_S, progress_interval: float | None = timing.PROGRESS_INTERVAL_S,
                 max_ack_pending: int = 20_000, max_deliver: int = -1,
                 inactive_threshold: float | None = None) -> None:
        """``progress_interval``: how often a message still in its handler gets a progress ack
        (None: never; then ``ack_wait`` must outlast every handler). ``max_deliver``: deliveries of
        one message at most (-1: no limit). ``subject``: the filter, or several (non-overlapping)."""
        self.nc = nc
        self.js = js
        self.stream = stream
        self.durable = durable
        self.subjects = (subject,) if isinstance(subject, str) else tuple(subject)
        self.subject = self.subjects[0]
        self.handler = handler
        self.concurrency = concurrency
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.max_deliver = max_deliver
        self.inactive_threshold = inactive_threshold  # seconds unused before the server removes it (None: never)
        self.progress_interval = progress_interval
        self._held: dict[int, tuple[Msg, float]] = {}  # id(msg) -> (msg, monotonic time of its last mark)
        self._progress_task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._sub: Subscription | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._request_id = 0
        self._outstanding = 0  # messages the open request may still bring
        self._wake = asyncio.Event()
        self._heard = 0.0  # monotonic time the open request last showed it is alive (a message or heartbeat)
        self._running = False

    async def start(self) -> None:
        # a literal filter goes into the create request's subject (a consumer ``name``): a worker's
        # credential may create only consumers held to its own tenant's jobs of its topics
        literal = len(self.subjects) == 1 and not any(token in ("*", ">") for token in self.subject.split("."))
        single = len(self.subjects) == 1
        config = ConsumerConfig(
            name=self.durable if literal else None,
            durable_name=self.durable, filter_subject=self.subject if single else None,
            filter_subjects=None if single else list(self.subjects), ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait, max_ack_pending=self.max_ack_pending, deliver_policy=DeliverPolicy.ALL,
            max_deliver=self.max_deliver, inactive_threshold=self.inactive_threshold,
        )
        await retrying(functools.partial(self._create, config),
                       what=f"creating consumer {self.durable} on {self.stream}", backoff=CREATE_BACKOFF,
                       attempts=60, logger=log,
                       passing=(TimeoutError, nats.errors.TimeoutError, ServiceUnavailableError, NoRespondersError))
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        self._running = True
        self._loop_task = asyncio.create_task(self._pull_loop(), name=f"pull-{self.durable}")
        if self.progress_interval is not None:
            self._progress_task = asyncio.create_task(self._progress_loop(self.progress_interval),
                                                      name=f"progress-{self.durable}")

    async def _create(self, config: ConsumerConfig) -> None:
        try:
            await self.js.add_consumer(self.stream, config)
        except BadRequestError as e:  # exists with another config: keep it, it still works
            log.warning("consumer %s on %s exists with other settings (%s); using it", self.durable,
                        self.stream, e.description)

    async def stop(self) -> None:
        self._running = False
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        if self._progress_task is not None:
            self._progress_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._progress_task

    @property
    def handling(self) -> set[asyncio.Task[None]]:
        """The handler tasks still running (after :meth:`stop`, those that outlasted its wait)."""
        return set(self._tasks)

    async def _progress_loop(self, interval: float) -> None:
        # one timer per consumer, not one per message; a message is marked at most every
        # interval and at least every 1.5 intervals, well inside the ack wait
        while True:
            await asyncio.sleep(interval)
            due = time.monotonic() - interval / 2
            for key, (msg, marked) in list(self._held.items()):
                if marked > due or msg._ackd:
                    continue
                self._held[key] = (msg, time.monotonic())
                with contextlib.suppress(Exception):  # reconnecting: the next one may get through
                    await msg.in_progress()

    async def _pull_loop(self) -> None:
        api = s.js_consumer_next(self.stream, self.durable)
        while self._running:
            if self._outstanding <= 0:
                # wait for room: never ask for more than the handlers can take
                free = self.concurrency - len(self._tasks)
                if free <= 0:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._request_id += 1
                self._outstanding = free
                self._heard = time.monotonic()
                request = {"batch": free, "expires": int(REQUEST_EXPIRES_S * 1e9),
                           "idle_heartbeat": int(IDLE_HEARTBEAT_S * 1e9)}
                try:
                    await self.nc.publish(api, json.dumps(request).encode(),
                                          reply=f"{self._inbox}.{self._request_id}")
                except Exception as e:  # reconnecting: try again shortly
                    log.warning("pull request for %s failed: %r", self.durable, e)
                    self._outstanding = 0
                    await asyncio.sleep(0.5)
                    continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), LOST_REQUEST_S)
            except TimeoutError:
                # a request the server forgot (a consumer leader killed, a node restarted) sends
                # no idle heartbeats: ask again at once rather than when it would have expired
                if time.monotonic() - self._heard >= LOST_REQUEST_S:
                    self._outstanding = 0

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get(_STATUS) if not msg.data else None
        if status is not None:
            # status messages come on the request's own inbox; data messages keep their subject
            current = msg.subject.rsplit(".", 1)[-1] == str(self._request_id)
            if current:
                self._heard = time.monotonic()
            if status != "100" and current:  # 404/408: request over; 409: leader change etc.
                self._outstanding = 0
                self._wake.set()
            return
        self._outstanding -= 1
        self._heard = time.monotonic()
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._outstanding <= 0:
            self._wake.set()

    async def _handle(self, msg: Msg) -> None:
        self._held[id(msg)] = (msg, time.monotonic())
        try:
            async with self._slots:
                try:
                    await self.handler(msg)
                except Exception:
                    log.exception("consumer %s: unhandled error", self.durable)
                    await self._give_up_on(msg)
        finally:
            del self._held[id(msg)]

    async def _give_up_on(self, msg: Msg) -> None:
        """A message whose handler keeps failing outside its own error handling (it could not even
        be dead-lettered) is terminated after ``MAX_UNHANDLED_DELIVERIES``: never redelivered forever."""
        with contextlib.suppress(Exception):  # no metadata (not a JetStream message) or the term is lost
            delivered = msg.metadata.num_delivered or 1
            if delivered >= MAX_UNHANDLED_DELIVERIES:
                log.error("consumer %s: terminating %s stream seq %s after %d failed deliveries", self.durable,
                          msg.subject, msg.metadata.sequence.stream, delivered)
                await msg.term()
