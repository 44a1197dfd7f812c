"""An in-process Interlock for integration tests: the five services and workers as tasks on the
test's event loop, against the session's real nats-server (auth on: services connect with their
service credential, workers with a worker credential of the harness's tenant and their topics,
the harness's own connection is admin)."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from interlock.contracts import headers
from interlock.contracts import subjects as s
from interlock.contracts.authorship import approval_bytes
from interlock.contracts.messages import (
    ApprovalDecision,
    ApprovalStatement,
    CommandReply,
    DeadLetter,
    SignedApproval,
    Trigger,
)
from interlock.core.eventstore import EventStore
from interlock.core.eventstore.authenticity import Authenticity
from interlock.core.ids import run_id_for
from interlock.core.run import Run
from interlock.core.topology import STREAMS
from interlock.identity import Signer
from interlock.runtime.connect import connect as connect_as
from interlock.runtime.consumer import PullConsumer
from interlock.runtime.deadletter import read_letter
from interlock.runtime.registry import WorkflowRegistry
from interlock.runtime.service import Service, ServiceSettings
from interlock.worker import Worker
from tests.principals import Principals

TERMINAL = {"RunSucceeded", "RunFailed", "RunDenied", "RunCancelled", "RunTimedOut"}
SETTLE_TIMEOUT_S = 20.0


def service_classes() -> list[type[Service]]:
    from interlock.approval.service import ApprovalService
    from interlock.dispatcher.service import DispatcherService
    from interlock.planner.service import PlannerService
    from interlock.policy.service import PolicyService

    return [PlannerService, PolicyService, ApprovalService, DispatcherService]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Harness:
    url: str
    nc: NATS
    tenant: str = "default"
    principals: Principals | None = None
    tls: Any = None
    """TLS settings for the harness's own connections (a server that requires TLS)."""
    writer: NATS | None = None
    """A service's connection (the planner's credential): only services append to run logs."""
    _sessions: dict[tuple[str, str], NATS] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    @property
    def store(self) -> EventStore:
        """The run logs, written as the planner would (a test that appends itself stands in for it)."""
        return self.store_as("planner")

    def store_as(self, service: str) -> EventStore:
        """The run logs, written (and signed) as ``service``: the others act only on what the
        keyring lets that service write."""
        nc = self.writer or self.nc
        if self.principals is None:
            return EventStore(nc, nc.jetstream(), service="test", writer=service)
        # it sees what the services see: commits the keyring does not vouch for are skipped
        authenticity = Authenticity(Signer.from_creds(self.principals.service(service)), self.principals.home.keyring())
        return EventStore(nc, nc.jetstream(), service="test", authenticity=authenticity, writer=service)

    def service_settings(self, service: str, settings: ServiceSettings | None = None, **values: Any
                         ) -> ServiceSettings:
        """Settings for a service of kind ``service`` on this harness's server, with its credential
        (``settings`` or ``values`` given win; no periodic reconciler unless asked for: sweeps over
        the session's shared server would make timings noisy)."""
        base = settings or ServiceSettings(**{"nats_url": self.url, "provision": False, "sweep_interval": 0, **values})
        if base.creds is None and self.principals is not None:
            base = base.model_copy(update={"creds": self.principals.service(service)})
        return base

    async def start_services(self, copies: int = 1, settings: ServiceSettings | None = None) -> None:
        if self.writer is None and self.principals is not None:
            self.writer = await connect(self.url, self.principals.service("planner"), self.tls)
        for cls in service_classes():
            for _ in range(copies):
                service = cls(self.service_settings(cls.name, settings))
                await service.start()
                self.services.append(service)

    async def start_worker(self, worker: Worker) -> Worker:
        """Start ``worker`` on the test's server, for the harness's tenant unless it names its own."""
        worker.nats_url = self.url
        worker.tenant = worker.tenant or self.tenant
        if worker.creds is None and self.principals is not None:
            worker.creds = self.principals.worker(sorted(worker.handlers), worker.tenant)
        await worker.start()
        self.workers.append(worker)
        return worker

    async def stop(self) -> None:
        for worker in self.workers:
            await worker.stop()
        for service in self.services:
            await service.stop()
        self.workers.clear()
        self.services.clear()
        for nc in [*self._sessions.values(), *([self.writer] if self.writer else [])]:
            await nc.close()
        self._sessions.clear()
        self.writer = None

    async def apply(self, yaml_text: str) -> None:
        await WorkflowRegistry(self.nc.jetstream()).apply(yaml_text)

    async def trigger(self, workflow_id: str, run_input: Any = None, *, key: str | None = None,
                      **extra: Any) -> str:
        key = key or uuid.uuid4().hex
        trigger = Trigger(workflow_id=workflow_id, input=run_input, idempotency_key=key, **extra)
        nc = await self.as_admin()  # the server lets a credential trigger its own tenant's runs only
        await nc.jetstream().publish(s.trigger(self.tenant, workflow_id), trigger.model_dump_json().encode(),
                                     headers={headers.MSG_ID: f"trigger:{self.tenant}:{workflow_id}:{key}"})
        return str(run_id_for(self.tenant, workflow_id, key))

    async def events(self, run_id: str) -> list[dict[str, Any]]:
        commits = await self.store.read_commits(self.tenant, run_id)
        return [e for c in commits for e in c.envelopes]

    async def wait_for(self, run_id: str, predicate: Callable[[list[dict[str, Any]]], bool],
                       timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        events: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            events = await self.events(run_id)
            if predicate(events):
                return events
            await asyncio.sleep(0.05)
        summary = [(e["type"], e.get("step_id")) for e in events]
        raise AssertionError(f"run {run_id}: condition not met within {timeout}s; events so far: {summary}")

    async def wait_end(self, run_id: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        return await self.wait_for(run_id, lambda evs: any(e["type"] in TERMINAL for e in evs), timeout)

    def consumers(self) -> list[PullConsumer]:
        """The durable consumers of this harness's running services and workers (not those other
        tests left on the session's server, which nothing consumes any more)."""
        # the services and the worker keep their consumers private; the barrier needs to see them
        return [c for svc in self.services for c in svc._consumers] + [c for w in self.workers for c in w._consumers]

    async def settled(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """The barrier before asserting that nothing else happens: wait until every consumer of the
        running services and workers has handled (acked, handler finished) every message of its
        stream up to the stream's last sequence, and the streams stayed put while we looked.

        After it, whatever those messages were going to cause — a duplicate dispatch, a second
        execution, a result, a notification — is already in the log or in the worker's record.
        A timer still scheduled for later is not waited for. Fails naming the consumers that lag.
        """
        js = self.nc.jetstream()
        # not the API audit: the stream_info calls below are recorded in it, so it always moves
        names = [spec.name for spec in STREAMS if spec.name != s.ADMIN_AUDIT_STREAM]
        deadline = time.monotonic() + timeout
        while True:
            before = {name: (await js.stream_info(name)).state.last_seq for name in names}
            lagging: list[str] = []
            seen: set[tuple[str, str]] = set()
            for consumer in self.consumers():
                # a worker acks its job before running it: its handler must also have finished
                if running := len(consumer._tasks):
                    lagging.append(f"{consumer.durable} on {consumer.stream}: {running} handler(s) running")
                if (consumer.stream, consumer.durable) in seen:
                    continue  # copies of a service share one durable consumer
                seen.add((consumer.stream, consumer.durable))
                info = await js.consumer_info(consumer.stream, consumer.durable)
                # num_pending: matching messages not yet delivered; num_ack_pending: delivered, not
                # yet acked (a nak'd retry waiting out its delay counts here too). Not "ack floor >=
                # last seq": a filtered consumer's floor stays at its last matching message.
                if info.num_pending or info.num_ack_pending:
                    floor = info.ack_floor.stream_seq if info.ack_floor else 0
                    lagging.append(f"{consumer.durable} on {consumer.stream}: ack floor {floor} of last seq "
                                   f"{before[consumer.stream]}, {info.num_pending} undelivered, "
                                   f"{info.num_ack_pending} unacked")
            after = {name: (await js.stream_info(name)).state.last_seq for name in names}
            moved = [f"{name} {before[name]} -> {after[name]}" for name in names if after[name] != before[name]]
            if not lagging and not moved:
                # messages already published to this connection (a notification, say) are read
                # before the flush's reply
                await self.nc.flush()
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled within {timeout}s: consumers lagging: {lagging or 'none'}; "
                                     f"streams still moving: {moved or 'none'}")
            await asyncio.sleep(0.02)

    async def dead_letters(self, service: str, marker: bytes, *, want: int, after_seq: int,
                           timeout: float = 10.0) -> list[DeadLetter]:
        """The first ``want`` dead letters of ``service`` after stream seq ``after_seq`` whose
        original bytes contain ``marker`` (fewer if they do not come within ``timeout``)."""
        found: list[DeadLetter] = []
        sub = await self.nc.jetstream().subscribe(
            s.dead_letter(service), ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while len(found) < want and loop.time() < deadline:
                try:
                    msg = await sub.next_msg(timeout=max(0.05, deadline - loop.time()))
                except TimeoutError:
                    break
                letter = read_letter(msg.subject, msg.data, msg.metadata.sequence.stream)
                if marker in base64.b64decode(letter.data_b64):
                    found.append(letter)
        finally:
            await sub.unsubscribe()
        return found

    async def run_state(self, run_id: str) -> Run:
        return (await self.store.load(self.tenant, run_id, fresh=True)).run

    async def decide(self, run_id: str, step_id: str, *, grant: bool = True, job_hash: str | None = None,
                     role: str | None = None, approver: str = "alice", reason: str = "",
                     body: dict[str, Any] | None = None, signer: Signer | None = None,
                     statement: dict[str, Any] | None = None, sign: bool = True) -> CommandReply:
        """Send ``approver``'s decision (the principal of the command subject), signed with the
        approver's own key (``signer``: another's; ``statement``: fields of the signed statement
        that differ; ``sign=False``: unsigned); ``body``: more fields of the ApprovalDecision (e.g.
        a deprecated ``approver`` or ``tenant`` that disagrees)."""
        run = await self.run_state(run_id)
        approval = run.steps[step_id].approval
        assert approval is not None, f"{step_id} has no approval request"
        job_hash = job_hash or approval.job_hash
        role = role or approval.approver_role
        signed = None
        if sign:
            if signer is None:
                await self.as_principal(approver)  # issues the approver's credential on first use
                assert self.principals is not None
                signer = Signer.from_creds(self.principals.person("admin", self.tenant, name=approver))
            said = ApprovalStatement(**{
                "tenant": self.tenant, "run_id": run_id, "step_id": step_id, "job_hash": job_hash,
                "snapshot_id": approval.snapshot_id, "decision": "approve" if grant else "reject",
                "principal": approver, "role": role, "reason": reason,
                "at": datetime.now(UTC).isoformat(), **(statement or {})})
            signed = SignedApproval(statement=said, key_id=signer.key_id,
                                    signature=signer.sign_b64(approval_bytes(said)))
        decision = ApprovalDecision(run_id=run_id, step_id=step_id, job_hash=job_hash, role=role, reason=reason,
                                    signed=signed, **(body or {}))
        return await self.command("approve" if grant else "reject", decision, principal=approver)

    async def as_principal(self, principal: str, tenant: str | None = None) -> NATS:
        """A connection as ``principal`` of ``tenant`` (an admin credential named so, issued on first
        use): the server lets a credential send commands only under its own name."""
        tenant = tenant or self.tenant
        if self.principals is None:
            return self.nc
        if (tenant, principal) not in self._sessions:
            creds = self.principals.person("admin", tenant, name=principal)
            self._sessions[(tenant, principal)] = await connect(self.url, creds, self.tls)
        return self._sessions[(tenant, principal)]

    async def as_admin(self, tenant: str | None = None) -> NATS:
        """A connection as the admin of ``tenant`` (default: the harness's; the default tenant's is
        :attr:`nc`)."""
        tenant = tenant or self.tenant
        if self.principals is None or tenant == "default":
            return self.nc
        if (tenant, "admin") not in self._sessions:
            self._sessions[(tenant, "admin")] = await connect(self.url, self.principals.admin(tenant), self.tls)
        return self._sessions[(tenant, "admin")]

    async def as_service(self, service: str) -> NATS:
        """A connection with ``service``'s credential (a test standing in for that service)."""
        if self.principals is None:
            return self.nc
        if ("service", service) not in self._sessions:
            self._sessions[("service", service)] = await connect(self.url, self.principals.service(service), self.tls)
        return self._sessions[("service", service)]

    async def as_worker(self, topics: list[str], tenant: str | None = None) -> NATS:
        """A connection with a worker credential of ``tenant`` for ``topics`` (a test's fake worker)."""
        tenant = tenant or self.tenant
        key = (tenant, "worker:" + ",".join(sorted(topics)))
        if self.principals is None:
            return self.nc
        if key not in self._sessions:
            self._sessions[key] = await connect(self.url, self.principals.worker(topics, tenant), self.tls)
        return self._sessions[key]

    async def as_custom(self, name: str, *, publish: tuple[str, ...] = (), subscribe: tuple[str, ...] = ()) -> NATS:
        """A connection allowed exactly ``publish`` and ``subscribe`` (and its inbox replies): what
        no Interlock role is, e.g. an external system publishing to a workflow's own trigger subject."""
        if self.principals is None:
            return self.nc
        if ("custom", name) not in self._sessions:
            creds = self.principals.custom(name, publish=publish, subscribe=subscribe)
            self._sessions[("custom", name)] = await connect(self.url, creds, self.tls)
        return self._sessions[("custom", name)]

    async def command(self, name: str, request: Any, *, principal: str = "alice",
                      tenant: str | None = None) -> CommandReply:
        """Send command ``name`` as ``principal`` of ``tenant`` (default: the harness's), on that
        principal's own connection."""
        nc = await self.as_principal(principal, tenant)
        msg = await nc.request(s.command(tenant or self.tenant, name, principal),
                               request.model_dump_json(exclude_none=True).encode(), timeout=5)
        return CommandReply.model_validate_json(msg.data)


def types(events: list[dict[str, Any]], step: str | None = None) -> list[str]:
    return [e["type"] for e in events if step is None or e.get("step_id") == step]


def outcome_counts(events: list[dict[str, Any]]) -> dict[tuple[str, int], int]:
    """(step, attempt) -> number of outcome events recorded for it (must never exceed 1)."""
    counts: dict[tuple[str, int], int] = {}
    for e in events:
        if e["type"] in ("StepSucceeded", "StepFailed"):
            key = (e["step_id"], e["data"].get("attempt", 0))
            counts[key] = counts.get(key, 0) + 1
    return counts


async def connect(url: str, creds: Path | None = None, tls: Any = None) -> NATS:
    """A test client's connection, as ``creds`` (the tests' fixtures give admin's); ``tls``: TLS settings."""
    return await connect_as(url, creds=creds, name="interlock-test", patient=False, tls=tls)



@dataclass
class Watched:
    """A connection that keeps what the server reports to it: a denied core publish or subscribe
    shows only here (the server tells the client through an -ERR, the call itself succeeds)."""

    nc: NATS
    errors: asyncio.Queue[Exception] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def violation(self, timeout: float = 3.0) -> Exception:
        """The next error the server reported (fails the test if none comes within ``timeout``)."""
        try:
            return await asyncio.wait_for(self.errors.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"the server reported no error within {timeout}s") from None


async def watched(url: str, creds: Path, tls: Any = None) -> Watched:
    """A test client's connection as ``creds`` that records the server's errors and does not reconnect."""
    session: Watched | None = None
    early: list[Exception] = []

    async def on_error(e: Exception) -> None:
        (session.errors.put_nowait(e) if session is not None else early.append(e))

    async def on_closed() -> None:
        if session is not None:
            session.closed.set()

    nc = await connect_as(url, creds=creds, name="interlock-test", patient=False, tls=tls, error_cb=on_error,
                          closed_cb=on_closed, allow_reconnect=False)
    session = Watched(nc)
    for e in early:
        session.errors.put_nowait(e)
    return session
