"""An in-process Interlock for integration tests: the five services and workers as tasks on the
test's event loop, against the session's real nats-server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client as NATS

from interlock.contracts import subjects as s
from interlock.contracts.messages import ApprovalDecision, CommandReply, Trigger
from interlock.core.eventstore import EventStore
from interlock.core.ids import run_id_for
from interlock.core.run import Run
from interlock.runtime.registry import WorkflowRegistry
from interlock.runtime.service import Service, ServiceSettings
from interlock.worker import Worker

TERMINAL = {"RunSucceeded", "RunFailed", "RunDenied", "RunCancelled", "RunTimedOut"}


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
    services: list[Service] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    @property
    def store(self) -> EventStore:
        return EventStore(self.nc, self.nc.jetstream(), service="test")

    async def start_services(self, copies: int = 1, settings: ServiceSettings | None = None) -> None:
        for cls in service_classes():
            for _ in range(copies):
                # no periodic reconciler in tests unless a test asks for one: sweeps over the
                # session's shared server would make timings noisy
                service = cls(settings or ServiceSettings(nats_url=self.url, provision=False, sweep_interval=0))
                await service.start()
                self.services.append(service)

    async def start_worker(self, worker: Worker) -> Worker:
        worker.nats_url = self.url
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

    async def apply(self, yaml_text: str) -> None:
        await WorkflowRegistry(self.nc.jetstream()).apply(yaml_text)

    async def trigger(self, workflow_id: str, run_input: Any = None, *, key: str | None = None,
                      **extra: Any) -> str:
        key = key or uuid.uuid4().hex
        trigger = Trigger(workflow_id=workflow_id, input=run_input, idempotency_key=key, tenant=self.tenant, **extra)
        await self.nc.jetstream().publish(s.trigger(workflow_id), trigger.model_dump_json().encode(),
                                          headers={"Nats-Msg-Id": f"trigger:{self.tenant}:{workflow_id}:{key}"})
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

    async def run_state(self, run_id: str) -> Run:
        return (await self.store.load(self.tenant, run_id, fresh=True)).run

    async def decide(self, run_id: str, step_id: str, *, grant: bool = True, job_hash: str | None = None,
                     role: str | None = None, approver: str = "alice", reason: str = "") -> CommandReply:
        run = await self.run_state(run_id)
        approval = run.steps[step_id].approval
        assert approval is not None, f"{step_id} has no approval request"
        decision = ApprovalDecision(run_id=run_id, tenant=self.tenant, step_id=step_id,
                                    job_hash=job_hash or approval.job_hash, approver=approver,
                                    role=role or approval.approver_role, reason=reason)
        msg = await self.nc.request(s.CMD_APPROVE if grant else s.CMD_REJECT,
                                    decision.model_dump_json().encode(), timeout=5)
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


async def connect(url: str) -> NATS:
    return await nats.connect(url)

