"""The design document's workflow, verbatim, end to end on a real stack with the example agents:
``type: job`` steps with only a ``topic`` and ``depends_on`` (so each job gets the run's input), an
approval step, ``retries: {max_attempts, backoff_ms}``, and a notify step with only ``depends_on``
(which sends a summary of the run)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from interlock.client import Client
from interlock.contracts import events as ev
from interlock.devstack import example_file
from interlock.devstack.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

WORKFLOW = """\
id: incident-remediation-doc
name: Incident remediation
version: 1.0.0
steps:
  detect:
    type: job
    topic: incident.detect
  classify:
    type: job
    topic: incident.classify
    depends_on: [detect]
  enrich:
    type: job
    topic: incident.enrich
    depends_on: [detect]
  patch_plan:
    type: job
    topic: incident.plan
    depends_on: [classify, enrich]
  approval:
    type: approval
    depends_on: [patch_plan]
    approvers: sre-oncall
  apply_patch:
    type: job
    topic: incident.apply
    depends_on: [approval]
    retries: {max_attempts: 3, backoff_ms: 200}
  notify:
    type: notify
    depends_on: [apply_patch]
"""
JOBS = ("detect", "classify", "enrich", "patch_plan", "apply_patch")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(home=tmp_path / "home", port=0, workers=[f"{example_file('agents.py')}:worker"])
    stack.start_nats()
    asyncio.run(stack.provision())
    stack.start()
    try:
        asyncio.run(stack.wait_ready(90))
        yield stack
    finally:
        stack.stop()


def test_the_design_documents_workflow_runs_as_written(stack: Stack) -> None:
    alert = {"alert": {"id": "INC-42", "host": "db-9", "service": "ledger", "symptom": "5xx after deploy"}}

    async def scenario() -> None:
        async with await Client.connect(stack.url, creds=stack.admin_creds) as client:
            workflow, _ = await client.apply_workflow(WORKFLOW, filename="design.yaml")
            assert (workflow.id, workflow.version) == ("incident-remediation-doc", "1.0.0")
            run_id = await client.start_run("incident-remediation-doc", alert, key="doc-1")

            async def approve(envelope: dict[str, object]) -> None:
                if envelope["type"] == ev.ApprovalRequested.type_name:
                    data = envelope["data"]
                    assert isinstance(data, dict)
                    await client.approve(run_id, data["step_id"], role=data["approver_role"],
                                         job_hash=data["job_hash"], reason="as the document says")

            final = await client.wait(run_id, timeout=120, on_event=approve)
            events = await client.events(run_id)
            assert final == ev.RunSucceeded.type_name, [(e["type"], e.get("step_id")) for e in events]
            outputs = {e["step_id"]: e["data"]["output"] for e in events if e["type"] == ev.StepSucceeded.type_name}
            # no `input:` anywhere: every agent got the run's input (the alert), not null
            assert outputs["detect"]["host"] == "db-9" and outputs["detect"]["service"] == "ledger"
            assert outputs["enrich"]["host"] == "db-9"
            assert outputs["classify"]["severity"] == "high"  # from the alert's symptom
            assert outputs["patch_plan"]["host"] == "db-9"
            assert outputs["apply_patch"]["applied"] == "PATCH-INC-42"
            assert outputs["apply_patch"]["attempt"] == 2  # the example agent fails once: retries applied
            # the notify step without a message sent the run's summary: workflow, run, each step's state
            message = outputs["notify"]["message"]
            assert message.startswith(f"workflow incident-remediation-doc run {run_id}: "), message
            for step in (*JOBS, "approval"):
                assert f"{step}=succeeded" in message, message

    asyncio.run(scenario())


def test_a_consumer_an_earlier_copy_left_behind_delays_ready_only_briefly(stack: Stack,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from nats.js.api import ConsumerConfig

    import interlock.devstack.stack as stack_module
    from interlock.contracts import subjects as s

    monkeypatch.setattr(stack_module, "ORPHAN_GRACE_S", 1.0)

    async def scenario() -> list[str]:
        async with await Client.connect(stack.url, creds=stack.admin_creds) as client:
            await client.js.add_consumer(s.TRIGGERS_STREAM, ConsumerConfig(durable_name="planner_gone",
                                                                           filter_subject=s.TRIGGERS_ALL))
            return await stack.wait_ready(30)

    assert asyncio.run(scenario()) == ["planner's consumer planner_gone is not pulled from (left by an earlier "
                                       "copy? delete it if so)"]
