"""Telemetry of a real stack: one run is one causal trace over OTLP, /metrics counters move, logs are JSON.

The stack runs as separate processes (as `interlock up` runs it) with the standard OTEL_*
variables pointing at an OTLP/HTTP receiver inside the test, a /metrics endpoint per process and
INTERLOCK_LOG_FORMAT=json."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from interlock.client import Client
from interlock.contracts import events as ev
from interlock.contracts import subjects
from interlock.devstack.stack import Stack
from interlock.runtime.connect import connect
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
SECRET = "sk-telemetry-do-not-log-4242"


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Received]]:
    tmp_path = tmp_path_factory.mktemp("telemetry")
    with otlp_receiver() as (endpoint, received):
        stack = Stack(home=tmp_path / "home", port=0, workers=[f"{HERE / 'telemetry_agents.py'}:worker"],
                      metrics=True,
                      env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                           "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "500",
                           "INTERLOCK_LOG_FORMAT": "json", "INTERLOCK_AUDITOR_DB": str(tmp_path / "auditor.sqlite3")})
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


async def _run_approved(stack: Stack) -> str:
    """Run the workflow once, approving its gate; its run id once it succeeded."""
    async with await Client.connect(stack.url, name="tel", creds=stack.admin_creds) as client:
        await client.apply_workflow(WORKFLOW)
        run_id = await client.start_run("tel-tree", {"api_key": SECRET}, key=f"tel-{uuid.uuid4().hex}")

        async def on_event(envelope: dict[str, object]) -> None:
            if envelope["type"] == ev.ApprovalRequested.type_name:
                data = envelope["data"]
                assert isinstance(data, dict)
                await client.approve(run_id, str(data["step_id"]), role=data["approver_role"],
                                     job_hash=data["job_hash"], reason="telemetry test")

        final = await client.wait(run_id, timeout=90, on_event=on_event)
        assert final == ev.RunSucceeded.type_name
        return run_id


def test_a_run_is_one_causal_trace_across_every_service(traced_stack: tuple[Stack, Received]) -> None:
    stack, received = traced_stack
    run_id = asyncio.run(_run_approved(stack))
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


def _scrape(stack: Stack, process: str) -> dict[str, float]:
    """``/metrics`` of one process: sample line (name and labels) -> value."""
    url = f"http://127.0.0.1:{stack.metrics_ports[process]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _total(samples: dict[str, float], metric: str, **labels: str) -> float:
    """Sum of ``metric``'s samples whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(value for name, value in samples.items()
               if name.split("{", 1)[0] == metric and all(w in name for w in wanted))


def _eventually(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_metrics_move_during_a_run(traced_stack: tuple[Stack, Received]) -> None:
    stack, _ = traced_stack
    _eventually(lambda: all(_port_open(stack.metrics_ports[p]) for p in ("auditor", "dispatcher", "planner")))
    before = {p: _scrape(stack, p) for p in ("auditor", "dispatcher")}
    asyncio.run(_run_approved(stack))

    def moved() -> bool:
        after = _scrape(stack, "auditor")
        return (_total(after, "interlock_runs_ended_total", workflow="tel-tree", status="succeeded")
                == _total(before["auditor"], "interlock_runs_ended_total", workflow="tel-tree", status="succeeded") + 1)

    assert _eventually(moved), "the auditor's runs_ended counter did not move"
    a0, a1 = before["auditor"], _scrape(stack, "auditor")

    def delta(metric: str, **labels: str) -> float:
        return _total(a1, metric, **labels) - _total(a0, metric, **labels)

    assert delta("interlock_runs_started_total", workflow="tel-tree") == 1
    # a, c, d on tel.ok; b twice on tel.flaky (one failure, one success)
    assert delta("interlock_step_duration_seconds_count", topic="tel.ok", status="succeeded") == 3
    assert delta("interlock_step_duration_seconds_count", topic="tel.flaky", status="failed") == 1
    assert delta("interlock_step_duration_seconds_count", topic="tel.flaky", status="succeeded") == 1
    assert delta("interlock_step_retries_total", topic="tel.flaky") == 1
    assert delta("interlock_step_scheduling_delay_seconds_count", topic="tel.ok") == 3
    assert delta("interlock_policy_decisions_total", outcome="allow") >= 4
    assert delta("interlock_approvals_requested_total", workflow="tel-tree") == 1
    assert delta("interlock_approvals_wait_seconds_count", outcome="granted") == 1
    assert _total(a1, "interlock_approvals_pending") == 0
    # the dispatcher handled results and heartbeats, and reports its consumers' backlog
    d1 = _scrape(stack, "dispatcher")
    assert _total(d1, "interlock_messages_handled_total", consumer="dispatcher_results") \
        >= _total(before["dispatcher"], "interlock_messages_handled_total", consumer="dispatcher_results") + 5
    assert _eventually(lambda: any(n.startswith("interlock_consumer_pending{") and 'consumer="dispatcher_results"' in n
                                   for n in _scrape(stack, "dispatcher")))


def test_a_poison_trigger_counts_as_a_dead_letter(traced_stack: tuple[Stack, Received]) -> None:
    stack, _ = traced_stack
    before = _total(_scrape(stack, "planner"), "interlock_dead_letters_total", service="planner")

    async def poison() -> None:
        nc = await connect(stack.url, creds=stack.admin_creds)
        try:
            await nc.jetstream().publish(subjects.trigger("default", "tel-tree"), b"{not json")
        finally:
            await nc.close()

    asyncio.run(poison())
    assert _eventually(lambda: _total(_scrape(stack, "planner"), "interlock_dead_letters_total", service="planner")
                       == before + 1)


def test_service_logs_are_json_with_run_context_and_no_secret(traced_stack: tuple[Stack, Received]) -> None:
    stack, _ = traced_stack
    run_id = asyncio.run(_run_approved(stack))
    records = []
    for path in sorted((stack.home / "logs").glob("*.log")):
        text = path.read_text(errors="replace")
        assert SECRET not in text, f"the run input's api_key reached {path.name}"
        for line in text.splitlines():
            if line.startswith("{"):
                records.append((path.stem, json.loads(line)))
    planner = [r for name, r in records if name == "planner" and r.get("run_id") == run_id]
    assert planner, "no JSON log record of the planner names the run"
    started = [r for r in planner if "started" in str(r.get("event"))]
    assert started and started[0]["service"] == "planner" and started[0]["level"] == "info"
    assert started[0]["trace_id"] == uuid.UUID(run_id).hex and len(started[0]["span_id"]) == 16
    assert started[0]["tenant"] == "default" and started[0]["timestamp"].endswith("Z")
    services = {name for name, r in records if r.get("service_instance")}
    assert {"planner", "dispatcher", "policy", "approval", "auditor"} <= services


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False
