"""interlock.client against a real nats-server and the services: every call the tools make."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from interlock.auditor.service import AuditorService
from interlock.client import (
    TERMINAL_EVENTS,
    Client,
    ClientError,
    NotFound,
    Refused,
    Unavailable,
    WorkflowInvalid,
)
from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, unique

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def chain(wf: str, topic: str, *, version: int = 1) -> str:
    return f"""
id: {wf}
version: {version}
steps:
  a: {{topic: {topic}, input: {{n: "{{{{ input.n }}}}"}}}}
  b: {{topic: {topic}, depends_on: [a], input: {{n: "{{{{ steps.a.output.n }}}}"}}}}
  c: {{topic: {topic}, depends_on: [b], input: {{n: "{{{{ steps.b.output.n }}}}"}}}}
"""


def gated(wf: str, topic: str) -> str:
    return f"""
id: {wf}
version: 1
steps:
  prepare: {{topic: {topic}, input: {{n: "{{{{ input.n }}}}"}}}}
  gate: {{type: approval, depends_on: [prepare], approvers: finance, prompt: "go?"}}
  pay: {{topic: {topic}, depends_on: [gate], input: {{n: 1}}}}
"""


@pytest.fixture
async def client(provisioned: str, admin_creds: Path) -> AsyncIterator[Client]:
    async with await Client.connect(provisioned, name="client-test", creds=admin_creds) as c:
        yield c


async def counting_worker(harness: Harness, topic: str, calls: list[str]) -> Worker:
    worker = Worker(unique("w"))

    @worker.job(topic)
    async def add_one(ctx: JobContext) -> dict[str, int]:
        calls.append(ctx.job.step_id)
        return {"n": int(ctx.input["n"]) + 1}

    return await harness.start_worker(worker)


async def until_event(client: Client, run_id: str, type_name: str) -> dict[str, Any]:
    async for envelope in client.watch(run_id, timeout=20):
        if envelope["type"] == type_name:
            return envelope
    raise AssertionError(f"run {run_id} ended without {type_name}")


# -- connecting ------------------------------------------------------------------------------
async def test_an_unreachable_server_is_one_line_naming_the_url_and_where_it_came_from(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(Unavailable, match=r"^cannot reach NATS at nats://127\.0\.0\.1:1 \(from argument\)"):
        await Client.connect("nats://127.0.0.1:1")
    monkeypatch.setenv("INTERLOCK_NATS_URL", "nats://127.0.0.1:2")
    with pytest.raises(Unavailable, match=r"at nats://127\.0\.0\.1:2 \(from INTERLOCK_NATS_URL\)") as info:
        await Client.connect()
    assert "\n" not in str(info.value)


async def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch, provisioned: str,
                                              tmp_path: Path, admin_creds: Path) -> None:
    monkeypatch.setenv("INTERLOCK_TENANT", "acme.eu")
    with pytest.raises(Unavailable, match=r"^INTERLOCK_TENANT: tenant 'acme.eu' is not a valid subject token"):
        await Client.connect(provisioned)
    monkeypatch.setenv("INTERLOCK_TENANT", "acme")
    monkeypatch.setenv("INTERLOCK_CREDS", str(tmp_path / "missing.creds"))
    with pytest.raises(Unavailable, match=r"^INTERLOCK_CREDS: .*missing\.creds: no such file"):
        await Client.connect(provisioned)
    monkeypatch.delenv("INTERLOCK_CREDS")
    monkeypatch.setenv("INTERLOCK_NATS_URL", "localhost:4222")
    with pytest.raises(Unavailable, match=r"^INTERLOCK_NATS_URL: 'localhost:4222' is not a URL"):
        await Client.connect()
    monkeypatch.delenv("INTERLOCK_NATS_URL")
    with pytest.raises(Unavailable, match=r"^tenant: tenant 'a b' is not a valid subject token"):
        await Client.connect(provisioned, tenant="a b")
    with pytest.raises(Unavailable, match=r"^creds: .*nope\.creds: no such file"):
        await Client.connect(provisioned, creds=tmp_path / "nope.creds")
    monkeypatch.setenv("INTERLOCK_CREDS", str(admin_creds))
    async with await Client.connect(provisioned) as c:
        assert c.tenant == "acme" and c.url == provisioned and c.url_source == "argument"
        assert (c.creds, c.creds_source) == (admin_creds, "INTERLOCK_CREDS")


async def test_a_command_nobody_serves_is_unavailable_naming_the_service_and_subject(client: Client) -> None:
    client.request_timeout = 0.5
    cancel = s.command(client.tenant, "cancel", client.principal)
    with pytest.raises(Unavailable, match=rf"^no planner service is running \(nobody answers on {cancel}\)$"):
        await client.cancel(str(uuid.uuid4()))
    runs = s.query(client.tenant, "runs")
    with pytest.raises(Unavailable, match=rf"^no auditor service is running \(nobody answers on {runs}\)$"):
        await client.runs()


# -- a run from start to audit ---------------------------------------------------------------
async def test_a_run_end_to_end_through_the_client(harness: Harness, auditor: AuditorService,
                                                   client: Client) -> None:
    wf, topic = unique("cl"), unique("t")
    created = await client.apply_workflow(chain(wf, topic))
    again = await client.apply_workflow(chain(wf, topic))
    assert (created[0].id, created[1], again[1]) == (wf, True, False)
    assert (wf, "1") in await client.workflows()
    assert set((await client.workflow(wf)).steps) == {"a", "b", "c"}
    calls: list[str] = []
    await counting_worker(harness, topic, calls)

    run_id = await client.start_run(wf, {"n": 1}, key=unique("k"), requested_by="test")
    seen: list[str] = []
    final = await client.wait(run_id, timeout=30, on_event=lambda e: seen.append(e["type"]))
    assert final == ev.RunSucceeded.type_name
    assert seen[-1] == final and seen[0] == ev.RunStarted.type_name
    events = await client.events(run_id)
    assert [e["type"] for e in events if e["type"] != ev.StepHeartbeat.type_name] == seen
    commits = await client.read_commits(run_id)
    assert sum(len(c.envelopes) for c in commits) == len(events)
    assert await client.read_commits(run_id, after_seq=commits[-1].stream_seq) == []
    run = await client.load_run(run_id)
    assert run.steps["c"].output == {"n": 4}
    assert (await client.verify(run_id)).ok

    status = await client.wait_projected(run_id)
    assert status["status"] == "succeeded"
    assert [st["step_id"] for st in status["steps"]] == ["a", "b", "c"]
    timeline = await client.timeline(run_id)
    assert [row["type"] for row in timeline] == [e["type"] for e in events]
    assert all(row["summary"] for row in timeline)
    assert run_id in [r["run_id"] for r in await client.runs(workflow_id=wf)]
    assert run_id in [r["run_id"] for r in await client.runs(status="succeeded", workflow_id=wf)]
    assert run_id not in [r["run_id"] for r in await client.runs(status="failed", workflow_id=wf)]

    # the same key is the same run: nothing starts twice
    assert await client.start_run(wf, {"n": 1}, key=run.idempotency_key) == run_id
    assert topic in [a.topic for a in await client.agents()]

    # a re-run from b reuses a's output: the worker sees b and c again, not a
    plan = await client.rerun_plan(run_id, "b")
    assert plan.rerun == {"b", "c"} and set(plan.reuse) == {"a"}
    assert plan.steps() == [("a", False), ("b", True), ("c", True)]
    calls.clear()
    rerun_id = await client.rerun(plan, requested_by="test")
    assert rerun_id != run_id
    assert await client.wait(rerun_id, timeout=30) == ev.RunSucceeded.type_name
    assert sorted(calls) == ["b", "c"]
    with pytest.raises(NotFound, match=r"has no step 'zz'; steps: a, b, c"):
        await client.rerun_plan(run_id, "zz")


async def test_unknown_and_invalid_things_raise_the_matching_error(harness: Harness, auditor: AuditorService,
                                                                   client: Client) -> None:
    wf, topic = unique("cl"), unique("t")
    await client.apply_workflow(chain(wf, topic))
    with pytest.raises(NotFound):
        await client.workflow(unique("nope"))
    with pytest.raises(NotFound):
        await client.start_run(unique("nope"), {})
    with pytest.raises(NotFound):
        await client.workflow(wf, "7")
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound):
        await client.load_run(missing)
    with pytest.raises(NotFound, match="not found"):
        await client.status(missing)
    with pytest.raises(WorkflowInvalid):
        await client.apply_workflow("id: x\nversion: 1\nsteps: {a: {depends_on: [nowhere]}}\n", filename="bad.yaml")
    with pytest.raises(Refused):  # same id and version, other content
        await client.apply_workflow(chain(wf, topic).replace("input.n", "input.m"))
    with pytest.raises(ClientError, match="did not finish within"):
        # nobody serves this topic: the run waits for ever
        await client.wait(await client.start_run(wf, {"n": 1}), timeout=0.5)


# -- approvals and cancellation ----------------------------------------------------------------
async def test_approve_with_the_pending_request_and_refusals_for_the_wrong_hash(
        harness: Harness, auditor: AuditorService, client: Client) -> None:
    wf, topic = unique("gate"), unique("t")
    await client.apply_workflow(gated(wf, topic))
    await counting_worker(harness, topic, [])
    run_id = await client.start_run(wf, {"n": 1})
    asked = await until_event(client, run_id, ev.ApprovalRequested.type_name)

    pending = await client.pending_approval(run_id, "gate")
    assert pending.job_hash == asked["data"]["job_hash"] and pending.approver_role == "finance"
    with pytest.raises(NotFound, match=r"^step 'prepare' of run .* has no pending approval; pending: gate$"):
        await client.pending_approval(run_id, "prepare")
    for _ in range(100):  # the auditor projects asynchronously
        if any(r["run_id"] == run_id for r in await client.approvals()):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the pending approval never showed in approvals()")

    with pytest.raises(Refused, match=r"^refused: "):
        await client.approve(run_id, "gate", job_hash="0" * 64)
    reply = await client.approve(run_id, "gate", reason="ok")
    assert reply.ok
    granted = [e for e in await client.events(run_id) if e["type"] == ev.ApprovalGranted.type_name]
    assert [e["data"]["approver"] for e in granted] == [client.principal]
    assert await client.wait(run_id, timeout=30) == ev.RunSucceeded.type_name


async def test_reject_and_cancel(harness: Harness, auditor: AuditorService, client: Client) -> None:
    wf, topic = unique("gate"), unique("t")
    await client.apply_workflow(gated(wf, topic))
    await counting_worker(harness, topic, [])
    rejected = await client.start_run(wf, {"n": 1})
    await until_event(client, rejected, ev.ApprovalRequested.type_name)
    assert (await client.reject(rejected, "gate", reason="no")).ok
    assert await client.wait(rejected, timeout=30) in TERMINAL_EVENTS - {ev.RunSucceeded.type_name}

    cancelled = await client.start_run(wf, {"n": 1})
    await until_event(client, cancelled, ev.ApprovalRequested.type_name)
    assert (await client.cancel(cancelled, reason="changed my mind")).ok
    assert await client.wait(cancelled, timeout=30) == ev.RunCancelled.type_name
    [cancel] = [e for e in await client.events(cancelled) if e["type"] == ev.RunCancelled.type_name]
    assert cancel["data"]["by"] == client.principal
    with pytest.raises(Refused):
        await client.cancel(cancelled)


# -- operations, policy, approvers -------------------------------------------------------------
async def test_dead_letters_show_what_a_service_could_not_process(harness: Harness, client: Client) -> None:
    wf = unique("dl")
    await client.js.publish(s.trigger(client.tenant, wf), b"{not json")
    for _ in range(100):
        letters = await client.dead_letters(limit=10_000)
        if any(d.subject == s.trigger(client.tenant, wf) for d in letters):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the malformed trigger was not dead-lettered")
    assert len(await client.dead_letters(limit=1)) == 1


async def test_a_foreign_message_on_a_dead_letter_subject_is_listed_as_unreadable(harness: Harness,
                                                                                   client: Client) -> None:
    foreign = b"\x00 not a dead letter " + uuid.uuid4().hex.encode()
    planner = (await harness.as_service("planner")).jetstream()
    ack = await planner.publish(s.dead_letter("planner"), foreign)
    trigger = s.trigger(client.tenant, unique("dl"))
    await client.js.publish(trigger, b"{not json")  # a real one after it
    for _ in range(100):
        letters = await client.dead_letters(limit=10_000)
        if any(d.subject == trigger for d in letters):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the malformed trigger was not listed")
    [unreadable] = [d for d in letters if d.subject == s.dead_letter("planner")]
    assert f"unreadable dead letter (stream seq {ack.seq}, {len(foreign)} bytes)" in unreadable.reason
    assert unreadable.size == len(foreign)


async def test_policy_decisions_simulation_and_refused_bundles(harness: Harness, client: Client) -> None:
    wf, topic = unique("pol"), unique("t")
    await client.apply_workflow(chain(wf, topic))
    await counting_worker(harness, topic, [])
    assert await client.wait(await client.start_run(wf, {"n": 1}), timeout=30) == ev.RunSucceeded.type_name

    active = await client.policy_active()
    assert active.snapshot_id and active.source
    decision = await client.policy_decide(wf, "a", {"n": 1}, explain=True)
    assert decision.decision == "allow" and decision.snapshot_id == active.snapshot_id
    assert decision.explain and all(m.action for m in decision.explain)
    with pytest.raises(NotFound, match="has no step 'zz'"):
        await client.policy_decide(wf, "zz")
    with pytest.raises(Refused, match=r"^policy not published: "):
        await client.policy_publish("this is not cedar", by="test")
    with pytest.raises(Refused, match=r"^policy not rolled back: no policy bundle version 'no-such'"):
        await client.policy_rollback(to="no-such", by="test")
    assert (await client.policy_active()).snapshot_id == active.snapshot_id
    assert [r.snapshot_id for r in await client.policy_history()][-1:] in ([], [active.snapshot_id])

    forbid_all = 'permit(principal, action, resource);\nforbid(principal, action == Action::"dispatch", resource);\n'
    simulation = await client.policy_simulate(forbid_all, limit=10_000)
    assert simulation.checked >= 3
    assert any(c.step_id == "a" and (c.was, c.now) == ("allow", "deny") for c in simulation.changes)
    with pytest.raises(Refused, match=r"^draft policy: "):
        await client.policy_simulate("nonsense(")


async def test_approver_directory(client: Client) -> None:
    name = unique("approver")
    try:
        assert await client.grant_approver(name, ["finance", "sre"]) == {"finance", "sre"}
        assert (await client.approvers())[name] == ["finance", "sre"]
        assert await client.revoke_approver(name, ["sre"]) == {"finance"}
    finally:
        assert await client.revoke_approver(name) == set()
    assert name not in await client.approvers()
