"""One run is one trace: every service's spans, parented causally, exported over OTLP.

The stack runs as separate processes (as `interlock up` runs it) with the standard OTEL_*
variables pointing at an OTLP/HTTP receiver inside the test."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from interlock.client import Client
from interlock.contracts import events as ev
from interlock.devstack.stack import Stack
from tests.e2e.otlp import Received, ReceivedSpan, otlp_receiver

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

HERE = Path(__file__).resolve().parent
WORKFLOW = """
id: tel-tree
version: 1
steps:
  a: {topic: tel.ok}
  b: {topic: tel.flaky, depends_on: [a], retries: {max_attempts: 2, backoff_ms: 50}}
  c: {topic: tel.ok, depends_on: [a]}
  gate: {type: approval, depends_on: [b, c], approvers: ops, expires_ms: 600000}
  d: {topic: tel.ok, depends_on: [gate]}
"""
SERVICES = {"planner", "policy", "approval", "dispatcher", "auditor", "worker"}


@pytest.fixture
def traced_stack(tmp_path: Path) -> Iterator[tuple[Stack, Received]]:
    with otlp_receiver() as (endpoint, received):
        stack = Stack(home=tmp_path / "home", port=0, workers=[f"{HERE / 'telemetry_agents.py'}:worker"],
                      env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                           "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "500",
                           "INTERLOCK_AUDITOR_DB": str(tmp_path / "auditor.sqlite3")})
        stack.start_nats()
        asyncio.run(stack.provision())
        stack.start()
        try:
            yield stack, received
        finally:
            stack.stop()


def _complete(spans: list[ReceivedSpan]) -> bool:
    services = {s.service.removeprefix("interlock-") for s in spans}
    attempts = {s.attributes.get("interlock.attempt") for s in spans
                if s.service == "interlock-worker" and s.attributes.get("interlock.step_id") == "b"}
    worker_steps = {s.attributes.get("interlock.step_id") for s in spans if s.service == "interlock-worker"}
    return services >= SERVICES and attempts == {1, 2} and worker_steps == {"a", "b", "c", "d"}


def test_a_run_is_one_causal_trace_across_every_service(traced_stack: tuple[Stack, Received]) -> None:
    stack, received = traced_stack

    async def scenario() -> str:
        async with await Client.connect(stack.url, name="tel", creds=stack.admin_creds) as client:
            await client.apply_workflow(WORKFLOW)
            run_id = await client.start_run("tel-tree", {}, key=f"tel-{uuid.uuid4().hex}")

            async def on_event(envelope: dict[str, object]) -> None:
                if envelope["type"] == ev.ApprovalRequested.type_name:
                    data = envelope["data"]
                    assert isinstance(data, dict)
                    await client.approve(run_id, str(data["step_id"]), role=data["approver_role"],
                                         job_hash=data["job_hash"], reason="telemetry test")

            final = await client.wait(run_id, timeout=90, on_event=on_event)
            assert final == ev.RunSucceeded.type_name
            return run_id

    run_id = asyncio.run(scenario())
    trace_id = uuid.UUID(run_id).hex
    deadline = time.monotonic() + 30
    while not _complete(received.of_trace(trace_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    spans = received.of_trace(trace_id)
    summary = sorted((s.service, s.name, str(s.attributes.get("interlock.step_id"))) for s in spans)
    assert _complete(spans), f"spans of run {run_id} so far: {summary}"
    by_id = {s.span_id: s for s in spans}

    # one root: the planner starting the run; every other span's parent was exported too
    roots = [s for s in spans if not s.parent_id]
    assert [(r.service, r.name) for r in roots] == [("interlock-planner", "planner start run")], summary
    dangling = [(s.service, s.name) for s in spans if s.parent_id and s.parent_id not in by_id]
    assert not dangling, f"spans whose parent was never exported: {dangling}"
    assert {s.attributes.get("interlock.run_id") for s in spans if s.service != "interlock-worker"} == {run_id}

    # causal order: no span starts before its parent
    assert all(s.start_ns >= by_id[s.parent_id].start_ns for s in spans if s.parent_id)

    def ancestors(span: ReceivedSpan) -> list[ReceivedSpan]:
        chain = []
        while span.parent_id:
            span = by_id[span.parent_id]
            chain.append(span)
        return chain

    worker = {(s.attributes["interlock.step_id"], s.attributes["interlock.attempt"]): s
              for s in spans if s.service == "interlock-worker"}
    # each job ran once per attempt, in one span (no duplicates from redelivery)
    assert sorted(worker) == [("a", 1), ("b", 1), ("b", 2), ("c", 1), ("d", 1)]
    assert len([s for s in spans if s.service == "interlock-worker"]) == 5
    # the retry follows the failed attempt; the parallel branches both descend from a's job
    assert worker[("b", 1)] in ancestors(worker[("b", 2)])
    assert worker[("a", 1)] in ancestors(worker[("b", 1)]) and worker[("a", 1)] in ancestors(worker[("c", 1)])
    # d ran after the approval: the approval service's handling of the decision is on its path
    d_path = ancestors(worker[("d", 1)])
    assert any(s.service == "interlock-approval" for s in d_path), [(s.service, s.name) for s in d_path]
    assert any(s.service == "interlock-policy" for s in d_path)
    # every job was dispatched by the dispatcher: a job span's parent is a dispatcher span
    assert {by_id[s.parent_id].service for s in worker.values()} == {"interlock-dispatcher"}
    # the auditor projected the run's commits inside the same trace
    assert any(s.service == "interlock-auditor" for s in spans)
    # every span says which process made it
    assert all(s.instance for s in spans), [(s.service, s.name) for s in spans if not s.instance]
