"""Approvals on the real services: approval steps, policy-held jobs, refused decisions."""

from __future__ import annotations

from typing import Any

import pytest

from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique

pytestmark = pytest.mark.integration


def of_type(events: list[dict[str, Any]], type_name: str, step: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_name and (step is None or e.get("step_id") == step)]


def failures(events: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    return [(e["type"], e.get("step_id"), e["data"].get("error") or e["data"].get("reason")) for e in events]


def gated(wf: str, topic: str) -> str:
    return f"""
id: {wf}
version: 1
steps:
  prepare: {{topic: {topic}, input: {{amount: "{{{{ input.amount }}}}"}}}}
  gate:
    type: approval
    depends_on: [prepare]
    approvers: finance
    prompt: "pay {{{{ steps.prepare.output.amount }}}}?"
  pay: {{topic: {topic}, depends_on: [gate], input: {{approved_by: "{{{{ steps.gate.output.approved_by }}}}"}}}}
"""


def requested(step: str) -> Any:
    return lambda evs: any(e["type"] == "ApprovalRequested" and e["step_id"] == step for e in evs)


async def _worker(harness: Harness, name: str, topic: str, calls: list[tuple[str, Any]]) -> None:
    worker = Worker(name)

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        calls.append((ctx.job.step_id, ctx.input))
        return ctx.input

    await harness.start_worker(worker)


async def test_approval_step_refuses_wrong_decisions_then_continues_when_approved(harness: Harness) -> None:
    wf, topic = unique("appr"), unique("t")
    await harness.apply(gated(wf, topic))
    calls: list[tuple[str, Any]] = []
    await _worker(harness, "appr", topic, calls)
    run_id = await harness.trigger(wf, {"amount": 42})
    events = await harness.wait_for(run_id, requested("gate"))
    request = of_type(events, "ApprovalRequested", "gate")[0]["data"]
    assert request["approver_role"] == "finance"
    assert request["prompt"] == "pay 42?"

    wrong_hash = await harness.decide(run_id, "gate", job_hash="0" * 64)
    assert not wrong_hash.ok
    assert "job hash" in (wrong_hash.error or "")
    wrong_role = await harness.decide(run_id, "gate", role="intern")
    assert not wrong_role.ok
    assert wrong_role.error == (f"'alice' may not approve step 'gate' of run {run_id}: 'alice' decided as role "
                                f"'intern'; the request needs role 'finance'; the request stays pending (the refusal "
                                f"is recorded in the run's log)")
    wrong_reject = await harness.decide(run_id, "gate", grant=False, role="intern")
    assert not wrong_reject.ok
    state = await harness.run_state(run_id)
    assert state.steps["gate"].status == "awaiting_approval"
    assert state.steps["gate"].approval is not None and state.steps["gate"].approval.status == "requested"
    assert "pay" not in state.steps
    events = await harness.events(run_id)
    assert not {"ApprovalGranted", "ApprovalRejected"} & set(types(events))
    assert [e["data"]["role"] for e in of_type(events, "ApprovalRefused", "gate")] == ["finance", "intern", "intern"]

    reply = await harness.decide(run_id, "gate", approver="alice", reason="budgeted")
    assert reply.ok, reply.error
    events = await harness.wait_end(run_id)
    await harness.settled()
    assert types(events)[-1] == "RunSucceeded", failures(events)
    granted = of_type(events, "ApprovalGranted", "gate")
    assert len(granted) == 1
    assert (granted[0]["data"]["approver"], granted[0]["data"]["role"]) == ("alice", "finance")
    assert calls == [("prepare", {"amount": 42}), ("pay", {"approved_by": "alice"})]

    late = await harness.decide(run_id, "gate")
    assert not late.ok, "a decided approval cannot be decided again"


async def test_rejected_approval_fails_the_run_with_the_reason(harness: Harness) -> None:
    wf, topic = unique("rej"), unique("t")
    await harness.apply(gated(wf, topic))
    calls: list[tuple[str, Any]] = []
    await _worker(harness, "rej", topic, calls)
    run_id = await harness.trigger(wf, {"amount": 10_000})
    await harness.wait_for(run_id, requested("gate"))
    reply = await harness.decide(run_id, "gate", grant=False, approver="bob", reason="too expensive")
    assert reply.ok, reply.error
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunFailed", failures(events)
    assert len(of_type(events, "ApprovalRejected", "gate")) == 1
    failed = of_type(events, "StepFailed", "gate")
    assert len(failed) == 1 and failed[0]["data"]["final"] is True
    assert failed[0]["data"]["error"]["kind"] == "approval_rejected"
    reason = of_type(events, "RunFailed")[0]["data"]["reason"]
    assert "gate" in reason and "rejected by bob: too expensive" in reason
    assert "pay" not in {e.get("step_id") for e in events}
    assert [c[0] for c in calls] == ["prepare"]


async def test_require_approval_holds_the_job_until_approved(harness: Harness) -> None:
    wf, topic = unique("hold"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  deploy: {{topic: {topic}, require_approval: true, input: {{env: prod}}}}
""")
    calls: list[tuple[str, Any]] = []
    await _worker(harness, "hold", topic, calls)
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_for(run_id, requested("deploy"))
    decided = of_type(events, "PolicyDecided", "deploy")[0]["data"]
    assert decided["decision"] == "require_approval"
    assert of_type(events, "ApprovalRequested", "deploy")[0]["data"]["approver_role"] == "approver"
    await harness.settled()
    events = await harness.events(run_id)
    assert "StepDispatched" not in types(events), "a held job must not reach a worker"
    assert calls == []
    wrong = await harness.decide(run_id, "deploy", job_hash="f" * 64)
    assert not wrong.ok and "job hash" in (wrong.error or "")

    reply = await harness.decide(run_id, "deploy", approver="carol")
    assert reply.ok, reply.error
    events = await harness.wait_end(run_id)
    await harness.settled()
    assert types(events)[-1] == "RunSucceeded", failures(events)
    seq = types(events, "deploy")
    assert seq.index("PolicyDecided") < seq.index("ApprovalRequested") < seq.index("ApprovalGranted") \
        < seq.index("StepDispatched") < seq.index("StepSucceeded")
    assert seq.count("StepDispatched") == 1
    assert calls == [("deploy", {"env": "prod"})]
