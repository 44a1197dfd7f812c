"""What every Interlock service shares: bootstrap, durable consumers, error handling, shutdown.

A service is a FastStream NATS app. Its subscribers are durable pull consumers on the streams
in :mod:`interlock.core.topology`; many copies of a service share one durable consumer, so
running more copies scales it out. Handlers ack only after their effects are durable, so a crash
at any point means redelivery, and every handler decides from the run's state, so redelivery
repeats nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import random
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from faststream.nats import NatsBroker, NatsCredentials, NatsMessage
from faststream.nats.security import NatsSecurity
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import BaseModel, ValidationError

from interlock.contracts import catalog as c
from interlock.contracts import events as ev
from interlock.contracts import routing, timing
from interlock.contracts import subjects as s
from interlock.core.eventstore import EventStore, EventStoreError, RunNotFound, StaleState
from interlock.core.eventstore.authenticity import Refusal
from interlock.core.eventstore.recorder import StoredCommit, stored_commit
from interlock.core.retry import Backoff, retrying
from interlock.core.run import IllegalTransition
from interlock.core.topology import provision
from interlock.runtime import logs, metrics, tracing
from interlock.runtime.connect import connect, creds_options
from interlock.runtime.consumer import PullConsumer
from interlock.runtime.datakeys import PayloadSealer
from interlock.runtime.deadletter import dead_letter
from interlock.runtime.lanes import LaneGate
from interlock.runtime.payloads import PayloadStore
from interlock.runtime.registry import WorkflowNotFound, WorkflowRegistry
from interlock.runtime.settings import ServiceSettings
from interlock.runtime.signing import KeyringWatch, authenticity_for
from interlock.runtime.tls import connect_options as tls_connect_options

log = logging.getLogger(__name__)

MAX_DELIVERIES_BEFORE_DLQ = 8
LAG_POLL_SECONDS = 5.0
STOP_DRAIN_S = 5.0
PROVISION_BACKOFF = Backoff(first=0.2, cap=5.0)
REDELIVERY_BACKOFF = Backoff(first=0.2, cap=10.0)  # a failed message comes back after 0.4 s, 0.8 s, …


RESUMED = ev.RunResumed.type_name


class Poison(Exception):
    """A message that can never be processed: it goes to the dead-letter stream."""


CommitHandler = Callable[[str, str, list[dict[str, Any]]], Awaitable[None]]


M = TypeVar("M", bound=BaseModel)


def decode(msg: Msg, model: type[M]) -> M:
    """A message as its contract type; one that does not validate is poison (dead-lettered).

    The span handling it is labelled with the run, step and attempt the message names (a timer's
    subject carries none of them)."""
    try:
        decoded = model.model_validate_json(msg.data)
    except ValidationError as e:
        raise Poison(f"invalid {model.__name__} on {msg.subject}: {e}") from e
    tracing.annotate(run_id=getattr(decoded, "run_id", None), step_id=getattr(decoded, "step_id", None),
                     attempt=getattr(decoded, "attempt", None))
    return decoded


R = TypeVar("R", bound=BaseModel)


def parse_request(kind: type[M], data: bytes) -> M | str:
    """The request in ``data``, or why it is not one (an empty body is a request with defaults)."""
    try:
        return kind.model_validate_json(data or b"{}")
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(body)'}: {err['msg']}" for err in e.errors()[:3])
        return f"invalid {kind.__name__}: {problems}"


def body_disagrees(field: str, given: str | None, expected: str, subject: str) -> str | None:
    """Why a request is refused whose body names a ``field`` (tenant, approver, …) other than
    the one its subject carries, else None (the deprecated body field is unset or agrees)."""
    if given is None or given == expected:
        return None
    return (f"the request names {field} {given!r} but was sent as {expected!r} (subject {subject}): "
            f"the {field} is taken from the subject, never from the body")


class Service:
    """Base of the five services. Subclasses set ``name`` and implement :meth:`register`."""

    name = "service"

    def __init__(self, settings: ServiceSettings | None = None) -> None:
        self.settings = settings or ServiceSettings()
        self.sealer = PayloadSealer.from_settings(self.settings)
        """Seals sensitive values that reach the service in clear (a raw trigger, a result from a
        worker that does not use the SDK) before they are stored."""
        self.nc: NATS
        self.js: JetStreamContext
        self.store: EventStore
        self.registry: WorkflowRegistry
        self.payloads: PayloadStore
        # FastStream logs every message at INFO; our handlers log what matters themselves
        broker_log = logging.getLogger(f"interlock.{self.name}.broker")
        broker_log.setLevel(logging.WARNING)
        # the broker's own connection (request-reply commands and queries): the same credential and TLS
        tls = tls_connect_options(self.settings.nats_url.split(","), self.settings)  # TLS: INTERLOCK_TLS_*
        secure: dict[str, Any] = {"ssl_context": tls["tls"], "use_ssl": True,
                                  "tls_hostname": tls.get("tls_hostname")} if tls else {}
        security: NatsSecurity | None = NatsSecurity(**secure) if tls else None
        auth: dict[str, Any] = {}
        if self.settings.creds is not None:
            security = NatsCredentials(str(self.settings.creds), **secure)
            auth = {"inbox_prefix": creds_options(self.settings.creds)["inbox_prefix"]}
        self.broker = NatsBroker(self.settings.nats_url.split(","), logger=broker_log, log_level=logging.DEBUG,
                                 max_reconnect_attempts=-1, reconnect_time_wait=1, security=security, **auth)
        self._stopped = asyncio.Event()
        self._consumers: list[PullConsumer] = []
        self._fast_signal: Any = None  # the core subscription to fast-lane commits (runtime/lanes.py)
        # fast-lane work first (#16): both lanes' consumers share it, and a fast run elsewhere holds slow work
        self.lanes = LaneGate(hold_s=self.settings.lane_hold_ms / 1000)
        self._sweeper: asyncio.Task[None] | None = None
        self._lag_poller: asyncio.Task[None] | None = None
        self._finished: set[tuple[str, str]] = set()  # runs known terminal: the sweep skips them
        self._reports: set[asyncio.Task[None]] = set()
        self.keyring: KeyringWatch

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.nc = await connect(self.settings.nats_url, creds=self.settings.creds, name=f"interlock-{self.name}",
                                tls=self.settings)
        self.js = self.nc.jetstream()
        # whoever bootstraps provisions, with the admin credential (`interlock up`, `interlock
        # provision`); a service credential may not change streams, so only when told to
        if self.settings.provision:
            await self._provision()
        self.keyring = KeyringWatch(self.js)
        await self.keyring.start()
        authenticity = authenticity_for(self.settings.creds, self.keyring, signing=self.settings.signing == "on",
                                        on_refused=self._refused, who=self.name)
        self.store = EventStore(self.nc, self.js, service=self.name, authenticity=authenticity)
        self.store.checkpoint = self.lanes.checkpoint  # started slow-lane work gives way to fast (#16)
        self.registry = WorkflowRegistry(self.js)
        self.payloads = PayloadStore(self.js, self.settings.inline_limit)
        await self.setup()
        self.register(self.broker)
        await self.broker.start()
        if self.name in c.FAST_LANE_SIGNAL.subscribers and self.lanes.hold_s:  # hold slow work while a fast run moves
            self._fast_signal = await self.nc.subscribe(s.FAST_LANE_COMMITS, cb=self._saw_fast)
        for consumer in self._consumers:
            await consumer.start()
        if self.settings.sweep_interval > 0 and type(self).reconcile is not Service.reconcile:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name=f"{self.name}-sweep")
        if metrics.enabled():
            self._lag_poller = asyncio.create_task(self._poll_lag(), name=f"{self.name}-lag")
        log.info("%s started (%s)", self.name, self.settings.instance)

    async def _saw_fast(self, msg: Msg) -> None:
        self.lanes.saw_fast()

    async def _provision(self, patience: float = 120.0) -> None:
        """Provision, riding through a leader election or a busy server at start-up."""
        await retrying(functools.partial(provision, self.js, self.settings.replicas),
                       what=f"{self.name}: provisioning", backoff=PROVISION_BACKOFF, patience=patience, logger=log)

    async def setup(self) -> None:
        """Hook for a service's own state before subscribers start."""

    def register(self, broker: NatsBroker) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self._lag_poller is not None:
            self._lag_poller.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sweeper
        # all consumers at once: each waits up to its handlers' grace, not one grace after another
        await asyncio.gather(*(consumer.stop() for consumer in self._consumers))
        await self.broker.stop()
        await self.keyring.stop()
        if self._reports:
            await asyncio.wait(set(self._reports), timeout=5)
        await self.teardown()
        if not self.nc.is_closed:
            try:  # a drain that cannot finish (a server gone away) must not hold the stop
                await asyncio.wait_for(self.nc.drain(), STOP_DRAIN_S)
            except Exception as e:
                log.warning("%s: the connection did not drain within %ss (%r); closing it", self.name, STOP_DRAIN_S, e)
                await self.nc.close()
        self._stopped.set()

    async def teardown(self) -> None:
        """Hook for a service's own clean-up."""

    async def run_forever(self) -> None:
        """Start, then run until SIGINT/SIGTERM."""
        await self.start()
        tune_gc()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("%s stopping", self.name)
        await self.stop()

    async def _poll_lag(self, every: float = LAG_POLL_SECONDS) -> None:
        """Each consumer's backlog and unacknowledged messages, for the metrics endpoint."""
        while True:
            for consumer in self._consumers:
                try:
                    info = await self.js.consumer_info(consumer.stream, consumer.durable)
                except Exception as e:  # an election, a reconnect: next time
                    log.debug("%s: consumer info of %s failed: %r", self.name, consumer.durable, e)
                    continue
                key = (consumer.stream, consumer.durable)
                metrics.gauges.consumer_pending[key] = int(info.num_pending or 0)
                metrics.gauges.consumer_ack_pending[key] = int(info.num_ack_pending or 0)
            await asyncio.sleep(every)

    # -- reconciler ----------------------------------------------------------------------------
    async def reconcile(self, tenant: str, run_id: str) -> None:
        """Move one active run on from its state; services that can get stuck override it."""

    async def active_runs(self) -> list[tuple[str, str]]:
        """Every run whose log does not end in a terminal event (from the stream's subject list)."""
        info = await self.js.stream_info(s.EVENTS_STREAM, subjects_filter=s.EVENTS_ALL)
        active = []
        # a run's log spans several subjects (one per writer and route): each run once
        for key in dict.fromkeys(s.parse_run_events(subject) for subject in (info.state.subjects or {})):
            if key in self._finished:
                continue
            try:
                handle = await self.store.load(*key, fresh=True)
            except EventStoreError as e:
                log.warning("%s sweep: cannot load run %s/%s: %s", self.name, *key, e)
                continue
            if handle.run.terminal:
                self._finished.add(key)
            else:
                active.append(key)
        return active

    async def sweep(self) -> int:
        """One reconciler pass: a stuck run (a lost message, a crash between two writes, a
        timer that never fired) is moved on from what its log says. Returns runs visited."""
        runs = await self.active_runs()
        for tenant, run_id in runs:
            try:
                await self.reconcile(tenant, run_id)
            except (IllegalTransition, RunNotFound):
                pass
            except Exception:
                log.exception("%s sweep: reconciling run %s failed", self.name, run_id)
        return len(runs)

    async def _sweep_loop(self) -> None:
        rng = random.Random()
        # the first pass soon after start: a restarted service picks up what its crash left
        await asyncio.sleep(min(2.0, self.settings.sweep_interval) * (0.5 + rng.random()))
        while True:
            try:
                await self.sweep()
            except Exception as e:  # a reconnect or an election: next time
                log.warning("%s sweep failed: %r", self.name, e)
            await asyncio.sleep(self.settings.sweep_interval * (0.75 + 0.5 * rng.random()))

    # -- consumers ---------------------------------------------------------------------------
    def durable(self, suffix: str = "") -> str:
        return f"{self.name}{'_' + suffix if suffix else ''}"

    def pull(self, broker: NatsBroker, subject: str | Sequence[str], stream: str, durable: str,
             handler: Callable[[Msg], Awaitable[None]], *, ack_wait: float = timing.ACK_WAIT_S,
             lane: str | Callable[[Msg], str | None] | None = None, held: bool = True,
             traced: bool = True) -> None:
        """A durable pull consumer, shared by every copy of this service, with guarded handling.

        JetStream consumption uses :class:`PullConsumer` rather than a FastStream pull
        subscriber: FastStream's batch fetch holds every message until its batch fills or times
        out, which would add that wait to every hop of every run. Request-reply commands and
        queries stay FastStream subscribers.

        ``lane``: the lane of every message (a consumer of one lane's commits), or how to tell a
        message's lane; its handler then goes through :attr:`lanes` (fast-lane work first).
        ``held=False``: slow-lane work a fast run may be waiting for, which a fast run moving in
        another process does not hold (:mod:`interlock.runtime.lanes`).
        ``traced=False``: the handler opens its message's span itself (:meth:`handling`), e.g.
        only for the commits it acts on.
        """

        what = durable.removeprefix(self.name).strip("_") or str(subject)
        handled = metrics.bound_counter(metrics.messages_handled, {"service": self.name, "consumer": durable})

        async def consume(msg: Msg) -> None:
            tenant, run_id = s.run_of(msg.subject) or (None, None)
            with logs.bound(tenant=tenant, run_id=run_id):
                if traced:
                    with self.handling(what, msg, tenant, run_id):
                        await self._in_lane(lane, held, msg, handler)
                else:
                    await self._in_lane(lane, held, msg, handler)
            handled.add(1)

        self._consumers.append(PullConsumer(
            self.nc, self.js, stream=stream, durable=durable, subject=subject, handler=consume,
            concurrency=self.settings.concurrency, ack_wait=ack_wait,
        ))

    async def _in_lane(self, lane: str | Callable[[Msg], str | None] | None, held: bool, msg: Msg,
                       handler: Callable[[Msg], Awaitable[None]]) -> None:
        """Handle ``msg`` guarded, through :attr:`lanes` when its consumer has a lane (fast first)."""
        if lane is None:
            await self.guarded(msg, handler)
            return
        async with self.lanes.lane(lane if isinstance(lane, str) else lane(msg), held=held):
            await self.guarded(msg, handler)

    def handling(self, what: str, msg: Msg, tenant: str | None, run_id: str | None
                 ) -> contextlib.AbstractContextManager[Any]:
        """The span of one message this service handles (see :func:`tracing.handling`)."""
        return tracing.handling(self.name, what, msg.headers, run_id=run_id, tenant=tenant)

    def pull_commits(self, broker: NatsBroker, handler: CommitHandler, *,
                     wants: frozenset[str] | Callable[[dict[str, Any]], bool] | None = None
                     ) -> None:
        """Consume the run commits routed to this service (:func:`routing.consumer_filters`: what
        it acts on, or what keeps its cached runs whole); call ``handler`` when relevant. Planner,
        policy and dispatcher consume each lane through its own consumer, the fast lane first."""

        async def on_commit(msg: Msg) -> None:
            try:
                tenant, run_id = s.parse_run_events(msg.subject)
            except ValueError as e:
                raise Poison(str(e)) from e
            meta = msg.metadata
            commit = stored_commit(meta.sequence.stream, msg.data, dict(msg.headers or {}), meta.timestamp.timestamp())
            envelopes = commit.envelopes
            if (tenant, run_id) in self._finished and any(e.get("type") == RESUMED for e in envelopes):
                self._finished.discard((tenant, run_id))  # a failed run resumed (issue 17): sweep it again
            wanted = wants is None or any(wants(e) if callable(wants) else e.get("type") in wants for e in envelopes)
            starts_run = bool(envelopes) and envelopes[0].get("seq") == 1
            if not wanted and not starts_run and not self.store.cached(tenant, run_id):
                # nothing here acts on it or keeps its run: no need to check it now (a load checks it)
                self.store.observe(tenant, run_id, meta.sequence.stream, commit)
                return
            # nothing acts on a commit the keyring does not vouch for (the refusal is reported,
            # dead-lettered, once per process: see _refused)
            await self.store.prepare([commit])
            if self.store.authenticity.check(s.run_events(tenant, run_id), commit, run_id, tenant) is not None:
                self.store.forget(tenant, run_id)
                return
            # a run's first commit starts its cached copy: acting on the run later reads nothing
            self.store.observe(tenant, run_id, meta.sequence.stream, commit, adopt=True)
            if wanted:
                # the span covers only commits this service acts on: one it merely caches (most
                # of what reaches it) would make a span that is never exported
                with self.handling("events", msg, tenant, run_id):
                    try:
                        await handler(tenant, run_id, envelopes)
                    except RunNotFound as e:
                        # the commit shows the run exists: the read came from a replica that lags
                        # (a node just restarted); a passing fault, retried, never dead-lettered
                        raise EventStoreError(f"run {run_id} not readable yet: {e}") from e

        if self.name not in routing.LANED:  # one consumer, its slow-lane commits held while a fast run moves
            self.pull(broker, routing.consumer_filters(self.name), s.EVENTS_STREAM, self.durable("events"), on_commit,
                      lane=lambda msg: s.lane_of_subject(msg.subject), traced=False)
            return
        # one consumer per lane (#16): a high-priority run's commits never wait behind a backlog's
        # on the server, and its handlers go first here (self.lanes); the fast one starts first, so a
        # backlog waiting at start-up does not get a head start
        self.pull(broker, routing.consumer_filters(self.name, s.FAST_LANE), s.EVENTS_STREAM,
                  self.durable("events_fast"), on_commit, lane=s.FAST_LANE, traced=False)
        self.pull(broker, routing.consumer_filters(self.name, s.SLOW_LANE), s.EVENTS_STREAM, self.durable("events"),
                  on_commit, lane=s.SLOW_LANE, traced=False)

    def answer(self, broker: NatsBroker, subject: str, kind: type[M], handler: Callable[[str, M], Awaitable[R]],
               refuse: Callable[[str], R], *, keep_invalid: bool = False) -> None:
        """Answer requests on ``subject`` (a wildcard; the copies share a queue group): ``handler``
        gets the request's own subject (its tenant, its principal) and the parsed body. The body is
        parsed here rather than by FastStream, so a malformed request is answered with
        ``refuse(why)`` instead of being dropped (the requester would time out). ``keep_invalid``
        (commands): a malformed request is also dead-lettered, so an operator sees who sent what."""

        async def handle(body: Any, msg: NatsMessage) -> Any:
            request = parse_request(kind, msg.body)
            if isinstance(request, str):
                if keep_invalid:
                    raw = msg.raw_message
                    try:
                        await dead_letter(self.js, self.name, raw.subject, raw.data, request, dict(raw.headers or {}))
                    except Exception:  # the refusal is the answer that matters; the dead letter is a record
                        log.exception("%s: could not dead-letter an invalid request on %s", self.name, raw.subject)
                return refuse(request)
            raw = msg.raw_message
            run_id = getattr(request, "run_id", None)
            with tracing.handling(self.name, kind.__name__, raw.headers, run_id=str(run_id) if run_id else None):
                return await handler(raw.subject, request)

        handle.__name__ = "answer_" + subject.replace(".", "_").replace("*", "any")
        broker.subscriber(subject, queue=self.name)(handle)

    def _refused(self, refusal: Refusal, commit: StoredCommit) -> None:
        """A commit the event store refused: an alert (an ERROR line on ``interlock.alert``, logged
        by the store) and a dead letter with the reason and the original bytes and headers."""
        async def record() -> None:
            try:
                await dead_letter(self.js, self.name, refusal.subject, commit.raw or b"", str(refusal),
                                  dict(commit.headers or {}))
            except Exception:
                log.exception("%s: could not dead-letter %s", self.name, refusal)

        task = asyncio.create_task(record(), name=f"{self.name}-refused")
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def guarded(self, msg: Msg, handler: Callable[[Msg], Awaitable[None]]) -> None:
        """Run a handler; ack on success, redeliver on a passing fault, dead-letter poison."""
        try:
            await handler(msg)
        except (Poison, RunNotFound, WorkflowNotFound, StaleState) as e:
            # a run whose workflow version is not registered can never be processed: no retries
            await self._dead_letter(msg, f"{type(e).__name__}: {e}")
        except IllegalTransition as e:
            # the state moved on (a duplicate or a late message): nothing left to do
            log.info("%s: %s", self.name, e)
            await msg.ack()
        except (EventStoreError, TimeoutError, OSError) as e:
            log.warning("%s: passing fault on %s, will retry: %r", self.name, msg.subject, e)
            await self._retry_or_dead_letter(msg, e)
        except Exception as e:
            log.exception("%s: handler failed on %s", self.name, msg.subject)
            await self._retry_or_dead_letter(msg, e)
        else:
            await msg.ack()

    async def _retry_or_dead_letter(self, msg: Msg, error: Exception) -> None:
        deliveries = msg.metadata.num_delivered or 1
        if deliveries >= MAX_DELIVERIES_BEFORE_DLQ:
            await self._dead_letter(msg, f"failed {deliveries} times, last: {type(error).__name__}: {error}")
            return
        await msg.nak(delay=REDELIVERY_BACKOFF.delay(deliveries))

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        try:
            await dead_letter(self.js, self.name, msg.subject, msg.data, reason, dict(msg.headers or {}))
        except Exception:
            # not even the bounded dead letter could be stored: stop redelivery rather than loop forever
            log.exception("%s: could not dead-letter a message from %s (stream seq %s, %d bytes, reason: %s); "
                          "terminating it", self.name, msg.subject, msg.metadata.sequence.stream, len(msg.data),
                          reason[:300])
            await msg.term()
            return
        await msg.ack()


GC_THRESHOLDS = (20_000, 20, 20)
"""The collector's thresholds in a service process. A service allocates many short-lived objects
per message (decoded commits, events, spans) and keeps long-lived cached runs: with CPython's
default (700, 10, 10) it collects young objects every few messages and rescans the cached runs
often. Fewer, larger collections cost less in all; cycles are still collected, only later."""


def tune_gc() -> None:
    """Freeze what start-up allocated (modules, settings, the keyring: never garbage) out of the
    collector's scans, and collect less often (:data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def run_service(service: Service) -> None:
    await service.run_forever()
