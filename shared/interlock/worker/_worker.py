from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from interlock.contracts import headers as h
from interlock.contracts import permissions as p
from interlock.contracts import protocol, timing
from interlock.contracts import subjects as s
from interlock.contracts.messages import (
    AgentRegistration,
    CancelNotice,
    Heartbeat,
    Job,
    JobError,
    JobResult,
    LlmCall,
)
from interlock.core.sealed import SealedError
from interlock.identity import PermissionDenied, creds_permissions
from interlock.runtime import telemetry, tracing
from interlock.runtime.connect import connect
from interlock.runtime.consumer import PullConsumer
from interlock.runtime.datakeys import DataKeyError, PayloadSealer
from interlock.runtime.deadletter import dead_letter
from interlock.runtime.payloads import PayloadStore
from interlock.runtime.publish import publish
from interlock.runtime.settings import WorkerSettings
from interlock.worker._errors import FatalError
from interlock.worker._versions import claim_slot

log = logging.getLogger("interlock.worker")

JobHandler = Callable[["JobContext"], Awaitable[Any]]
REGISTRY_REFRESH_S = protocol.REGISTRY_REFRESH_S


@dataclass
class JobContext:
    """What a handler gets: the job, its input (sealed values opened: the clear values) and a way to
    report progress. ``job.input`` keeps them sealed."""

    job: Job
    input: Any
    worker_id: str
    _beat: Callable[[str | None], Awaitable[None]] = field(repr=False)

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def attempt(self) -> int:
        return self.job.attempt

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of one step in one run: use it to make side effects idempotent."""
        return self.job.idempotency_key

    @property
    def deadline(self) -> datetime | None:
        return self.job.deadline

    @property
    def constraints(self) -> dict[str, Any]:
        return self.job.constraints

    usage: list[LlmCall] = field(default_factory=list)
    """Model calls recorded with :meth:`record_llm`; they travel in the job's result."""

    async def heartbeat(self, progress: str | None = None) -> None:
        """Report progress now (heartbeats are also sent automatically while the handler runs)."""
        await self._beat(progress)

    def record_llm(self, *, provider: str, model: str, input_tokens: int = 0, output_tokens: int = 0,
                   cost_usd: float = 0.0, temperature: float | None = None, prompt_ref: str | None = None,
                   prompt: str | None = None, operation: str = "chat") -> LlmCall:
        """Record one model call: it is stored in the step's outcome event, shown in the timeline,
        summed by ``interlock cost`` and checked against the step's and the run's budgets.

        ``prompt`` is kept only when the workflow sets ``record_prompts: true``; otherwise give a
        ``prompt_ref`` (a template id or a hash) and keep the prompt where it belongs."""
        call = LlmCall(provider=provider, model=model, operation=operation, input_tokens=input_tokens,
                       output_tokens=output_tokens, cost_usd=cost_usd, temperature=temperature,
                       prompt_ref=prompt_ref, prompt=prompt if self.job.record_prompts else None)
        self.usage.append(call)
        tracing.llm_call_span(call)
        return call


@dataclass
class _Registration:
    topic: str
    handler: JobHandler
    version: str
    capabilities: list[str]


def _safe(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", token)


class Worker:
    """A process's agent handlers for one tenant, one durable consumer per job topic, shared with
    the tenant's other copies (another tenant's jobs of the same topic never reach it)."""

    def __init__(self, name: str = "worker", *, nats_url: str | None = None, concurrency: int | None = None,
                 inline_limit: int | None = None, tenant: str | None = None,
                 settings: WorkerSettings | None = None, creds: Path | str | None = None) -> None:
        """Arguments left out (``None``) come from ``settings``, by default :class:`WorkerSettings`
        read from the environment when the worker starts (``tenant``: ``INTERLOCK_TENANT``, else
        ``default``). ``creds``: the worker's ``.creds`` file (default ``INTERLOCK_CREDS``), a worker
        credential of its tenant and topics."""
        self.name = name
        self.nats_url = nats_url
        self.tenant = s.token(tenant, "tenant") if tenant is not None else None
        self.creds = Path(creds) if creds is not None else None
        self.concurrency = concurrency
        self.inline_limit = inline_limit
        self.settings = settings
        self.worker_id = _safe(f"{name}-{socket.gethostname()}-{os.getpid()}")
        self.handlers: dict[str, _Registration] = {}
        self._nc: NATS | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Task[None]] = {}  # job id -> handler task
        self._job_spans: dict[str, str] = {}  # job id -> traceparent of its handler's span
        self._contexts: dict[str, JobContext] = {}  # job id -> its handler's context (model usage)
        self._consumers: list[PullConsumer] = []
        self._stop = asyncio.Event()
        self.started_at = datetime.now(UTC)

    def job(self, topic: str, *, version: str = "1", capabilities: list[str] | tuple[str, ...] = ()
            ) -> Callable[[JobHandler], JobHandler]:
        """Register an async function as the handler of a job topic."""
        s.topic_tokens(topic)

        def register(handler: JobHandler) -> JobHandler:
            if topic in self.handlers:
                raise ValueError(f"topic {topic!r} already has a handler in worker {self.name!r}")
            self.handlers[topic] = _Registration(topic, handler, version, list(capabilities))
            return handler

        return register

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.handlers:
            raise ValueError(f"worker {self.name!r} has no job handlers")
        settings = self.settings or WorkerSettings()
        tenant = self.tenant = s.token(self.tenant or settings.tenant, "tenant")
        concurrency = settings.concurrency if self.concurrency is None else self.concurrency
        telemetry.setup("worker", settings, instance=self.name, logging_too=False)
        self._stop.clear()
        creds = self.creds or settings.creds
        versioned = set(self.handlers)  # topics whose version's own jobs this worker takes too
        if creds is not None:
            self._check_creds(creds, tenant)
            versioned = self._versioned_topics(creds, tenant)
        self._nc = nc = await connect(self.nats_url or settings.nats_url, creds=creds,
                                      name=f"interlock-worker-{self.name}", tls=settings)
        js = nc.jetstream()
        inline_limit = settings.inline_limit if self.inline_limit is None else self.inline_limit
        self._payloads = PayloadStore(js, inline_limit)
        self._sealer = PayloadSealer.from_settings(settings)
        await nc.subscribe(s.tenant_control_cancel(tenant), cb=self._on_cancel)
        for registration in self.handlers.values():
            consumer = PullConsumer(
                nc, js, stream=s.JOBS_STREAM, durable=s.worker_consumer(tenant, registration.topic),
                subject=s.job(tenant, registration.topic), concurrency=concurrency,
                ack_wait=protocol.WORKER_CONSUMER.ack_wait_s, max_ack_pending=protocol.WORKER_CONSUMER.max_ack_pending,
                progress_interval=timing.PROGRESS_INTERVAL_S, max_deliver=protocol.WORKER_CONSUMER.max_deliver,
                handler=functools.partial(self._handle, js, registration=registration),
            )
            await consumer.start()
            self._consumers.append(consumer)
            if registration.topic in versioned:
                await self._consume_version(nc, js, tenant, registration, concurrency)
        # registered before start() returns: an operator listing agents right after sees this one
        registry = await js.key_value(s.AGENTS_BUCKET)
        await self._register(registry)
        self._spawn(self._registry_loop(registry))
        log.info("worker %s serving %s for tenant %s", self.worker_id, ", ".join(sorted(self.handlers)), tenant)

    def _check_creds(self, creds: Path, tenant: str) -> None:
        """Refuse at once, naming the topic and the permission, a credential that may not pull this
        tenant's jobs of every topic served (the server would only drop the request, silently)."""
        permissions = creds_permissions(creds)
        for topic in sorted(self.handlers):
            durable = s.worker_consumer(tenant, topic)
            subject = p.js_filtered_consumer_create(s.JOBS_STREAM, s.job(tenant, topic), durable)
            if not permissions.allows_publish(subject):
                action = f"pull tenant {tenant}'s jobs of topic {topic!r}"
                raise PermissionDenied(f"worker {self.name} ({creds}) may not {action}: the credential lacks "
                                       f"permission to publish to {subject!r} (issue one for this tenant and topic: "
                                       f"interlock creds issue --role worker --tenant {tenant} --topics {topic})",
                                       principal=str(creds), action=action, subject=subject)

    def _versioned_topics(self, creds: Path, tenant: str) -> set[str]:
        """Topics whose versioned jobs the credential lets this worker take (one issued before
        versioned routing existed may not: those topics get unversioned jobs only)."""
        permissions = creds_permissions(creds)
        allowed = set()
        for topic, reg in self.handlers.items():
            durable = s.worker_version_consumer(tenant, topic, 0)
            subject = p.js_filtered_consumer_create(s.JOBS_STREAM, s.versioned_job(tenant, reg.version, topic), durable)
            if permissions.allows_publish(subject):
                allowed.add(topic)
            else:
                log.warning("worker %s: its credential may not pull version %s's own jobs of topic %r (%s): it "
                            "takes unversioned jobs only; reissue it to take part in rollouts", self.name,
                            reg.version, topic, subject)
        return allowed

    async def _consume_version(self, nc: NATS, js: JetStreamContext, tenant: str, registration: _Registration,
                               concurrency: int) -> None:
        """Also take the jobs routed to this worker's version of the topic (canary rollouts, steps
        with an agent_version range)."""
        durable = await claim_slot(nc, js, tenant, registration.topic, registration.version)
        if durable is None:
            return
        consumer = PullConsumer(
            nc, js, stream=s.JOBS_STREAM, durable=durable,
            subject=s.versioned_job(tenant, registration.version, registration.topic), concurrency=concurrency,
            ack_wait=protocol.WORKER_CONSUMER.ack_wait_s, max_ack_pending=protocol.WORKER_CONSUMER.max_ack_pending,
            progress_interval=timing.PROGRESS_INTERVAL_S, max_deliver=protocol.WORKER_CONSUMER.max_deliver,
            inactive_threshold=protocol.VERSION_SLOT_IDLE_S,
            handler=functools.partial(self._handle, js, registration=registration),
        )
        await consumer.start()
        self._consumers.append(consumer)

    async def stop(self) -> None:
        self._stop.set()
        handling: set[asyncio.Task[None]] = set()
        for consumer in self._consumers:
            await consumer.stop()  # running jobs get a while to finish
            handling |= consumer.handling
        self._consumers.clear()
        for task in list(self._running.values()):
            task.cancel()
        if handling:  # the jobs cancelled just now go back to the queue (nak) before we disconnect
            await asyncio.wait(handling, timeout=5)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                kv = await self._nc.jetstream().key_value(s.AGENTS_BUCKET)
                for topic in self.handlers:
                    await kv.delete(s.agent_key(self.tenant or "", topic, self.worker_id))
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None

    async def run(self) -> None:
        """Start and serve until :meth:`stop` or cancellation."""
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- consuming ---------------------------------------------------------------------------
    async def _handle(self, js: JetStreamContext, msg: Msg, *, registration: _Registration) -> None:
        try:
            job = Job.model_validate_json(msg.data)
        except ValidationError as e:
            await dead_letter(js, "worker", msg.subject, msg.data, f"invalid job: {e}")
            await msg.ack()
            return
        if job.tenant != self.tenant:  # the dispatcher never does this: refuse rather than serve it
            await dead_letter(js, "worker", msg.subject, msg.data,
                              f"job {job.job_id} of tenant {job.tenant!r} reached worker {self.worker_id} of "
                              f"tenant {self.tenant!r}")
            await msg.ack()
            return
        running = self._running.get(job.job_id)
        if running is not None:
            # redelivered to the copy that still runs it (its progress acks were late): keep holding
            # this delivery until that run ends, rather than doing the job twice here
            await asyncio.wait([running])
            await msg.ack()
            return
        # the job stays un-acked while it runs: the consumer's progress acks keep it ours, and if
        # this process dies it goes to another copy within the ack wait (interlock.contracts.timing)
        try:
            await self._run_job(js, job, registration)
        except asyncio.CancelledError:
            if self._stop.is_set():
                with contextlib.suppress(Exception):
                    await msg.nak()  # shutting down: another copy takes the job at once
            raise
        await msg.ack()  # the result is durable (or the run was cancelled): the job leaves the queue

    async def _run_job(self, js: JetStreamContext, job: Job, registration: _Registration) -> None:
        async def beat(progress: str | None = None) -> None:
            hb = Heartbeat(job_id=job.job_id, run_id=job.run_id, tenant=job.tenant, step_id=job.step_id,
                           attempt=job.attempt, worker=self.worker_id, progress=progress)
            with contextlib.suppress(Exception):
                await js.publish(s.heartbeat(job.tenant, job.run_id), hb.model_dump_json().encode(), timeout=2)

        async def keep_beating() -> None:
            while True:
                await asyncio.sleep(job.heartbeat_interval_ms / 1000)
                await beat(None)

        # the first beat at once: it starts the job's lease, so a worker that dies before it
        # reports is noticed within the heartbeat timeout, not at the job's deadline
        await beat("started")
        beating = asyncio.ensure_future(keep_beating())
        result: JobResult
        try:
            # the handler gets sealed values in clear; what it returns leaves sealed
            job_input = self._sealer.open_tree(job.tenant, await self._payloads.resolve(job.input, job.input_ref))
            ctx = self._contexts[job.job_id] = JobContext(job=job, input=job_input, worker_id=self.worker_id,
                                                          _beat=beat)
            task = asyncio.ensure_future(self._call(registration.handler, ctx, job))
            self._running[job.job_id] = task
            output = self._sealer.seal_tree(job.tenant, job.run_id, await task, "output", tuple(job.sensitive_output))
            output_value, output_ref = await self._payloads.offload(output)
            result = self._result(job, ok=True, output=output_value, output_ref=output_ref)
        except asyncio.CancelledError:
            if self._stop.is_set():
                raise  # shutting down: no result; the job goes back to the queue
            log.info("job %s cancelled: its run ended", job.job_id)
            return
        except (SealedError, DataKeyError) as e:  # e.g. "data key destroyed": no attempt can do better
            log.warning("job %s: %s", job.job_id, e)
            result = self._result(job, ok=False, error=JobError(message=str(e), retryable=False, kind="sealed"))
        except FatalError as e:
            result = self._result(job, ok=False, error=JobError(message=str(e) or type(e).__name__, retryable=False,
                                                                kind="fatal"))
        except TimeoutError:
            result = self._result(job, ok=False, error=JobError(message="the handler ran past the job deadline",
                                                                retryable=True, kind="timeout"))
        except Exception as e:
            log.warning("job %s failed: %r", job.job_id, e)
            result = self._result(job, ok=False, error=JobError(message=f"{type(e).__name__}: {e}", retryable=True))
        finally:
            beating.cancel()
            self._running.pop(job.job_id, None)
            span_of_job = self._job_spans.pop(job.job_id, None) or ""
            self._contexts.pop(job.job_id, None)
        # the result must land even through a leader election: retried, deduplicated by id
        # the dispatcher handles the result inside this job's span (its trace, its parent)
        await publish(js, s.result(job.tenant, job.run_id), result.model_dump_json().encode(),
                      headers={h.MSG_ID: f"result:{job.job_id}", h.TRACEPARENT: span_of_job}, patience=120.0)

    async def _call(self, handler: JobHandler, ctx: JobContext, job: Job) -> Any:
        # the handler runs inside the run's trace (continued from the job's traceparent)
        with tracing.tracer.start_as_current_span(
            f"job {job.topic}", context=tracing.context_of(job.trace_parent),
            attributes={"interlock.run_id": job.run_id, "interlock.step_id": job.step_id,
                        "interlock.attempt": job.attempt, "interlock.job_id": job.job_id,
                        "interlock.tenant": job.tenant, "interlock.worker": self.worker_id},
        ):
            traceparent = tracing.current_traceparent()
            if traceparent:
                self._job_spans[job.job_id] = traceparent
            if job.deadline is None:
                return await handler(ctx)
            remaining = (job.deadline - datetime.now(UTC)).total_seconds()
            async with asyncio.timeout(max(0.0, remaining)):
                return await handler(ctx)

    def _result(self, job: Job, *, ok: bool, output: Any = None, output_ref: Any = None,
                error: JobError | None = None) -> JobResult:
        ctx = self._contexts.get(job.job_id)
        return JobResult(job_id=job.job_id, run_id=job.run_id, tenant=job.tenant, step_id=job.step_id,
                         attempt=job.attempt, ok=ok, output=output, output_ref=output_ref, error=error,
                         worker=self.worker_id, usage=list(ctx.usage) if ctx else [])

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            notice = CancelNotice.model_validate_json(msg.data)
        except ValidationError:
            return
        for jid, task in list(self._running.items()):
            if jid.startswith(notice.run_id + ":"):
                task.cancel()

    # -- agent registry ----------------------------------------------------------------------
    async def _register(self, kv: KeyValue) -> None:
        now = datetime.now(UTC)
        for reg in self.handlers.values():
            entry = AgentRegistration(worker_id=self.worker_id, topic=reg.topic, tenant=self.tenant or "",
                                      version=reg.version,
                                      capabilities=reg.capabilities, host=socket.gethostname(), pid=os.getpid(),
                                      started_at=self.started_at, last_heartbeat=now)
            with contextlib.suppress(Exception):
                await kv.put(s.agent_key(entry.tenant, reg.topic, self.worker_id), entry.model_dump_json().encode())

    async def _registry_loop(self, kv: KeyValue) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._stop.wait(), REGISTRY_REFRESH_S)
            if not self._stop.is_set():
                await self._register(kv)
