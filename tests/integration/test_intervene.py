"""Intervening in a run and feedback on step outputs (issue 17), on the session's nats-server with
auth and two copies of every service: a patched retry is decided and approved again for its new job hash,
skip unblocks downstream, resume finishes the same run, pause holds dispatching, feedback survives
a projection rebuild, and a viewer or another tenant's operator may not intervene."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from interlock.auditor.service import AuditorService
from interlock.client import Client, Refused
from interlock.contracts import subjects as s
from interlock.contracts.messages import RetryStepRequest, RunControlRequest
from interlock.core.codec import canonical_json, sha256_hex
from interlock.worker import FatalError, JobContext, Worker
from tests.integration.harness import Harness, types, unique
from tests.integration.test_cli import cli
from tests.integration.test_permission_matrix import Matrix, assert_request_dropped, refused_at_once

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture
async def matrix(harness: Harness) -> AsyncIterator[Matrix]:
    """The harness with two copies of every service (any copy may answer a command or handle the
    commit that follows it), and clients as new principals of any role and tenant."""
    await harness.start_services(copies=1)  # the fixture started the first copies
    async with contextlib.AsyncExitStack() as stack:
        yield Matrix(harness, stack)


def of_type(events: list[dict[str, Any]], type_name: str, step: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_name and (step is None or e.get("step_id") == step)]


def ended_again(events: list[dict[str, Any]], after_seq: int) -> bool:
    """The run reached a terminal event after ``after_seq`` (a resumed run's second end)."""
    return any(e["seq"] > after_seq and e["type"] in ("RunSucceeded", "RunFailed", "RunDenied", "RunCancelled",
                                                      "RunTimedOut") for e in events)


async def failing_run(m: Matrix, tenant: str = "default") -> tuple[Harness, str, list[dict[str, Any]]]:
    """A run of ``tenant`` whose step ``a`` failed (fatally) on its first attempt: the run failed; a
    retry of ``a`` succeeds, and ``b`` (after ``a``) echoes a's output."""
    h = m.tenant(tenant)
    wf, topic = unique("iv"), unique("t")
    await h.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}, input: {{n: "{{{{ input.n }}}}"}}}}
  b: {{topic: {topic}, depends_on: [a], input: {{from_a: "{{{{ steps.a.output.value }}}}"}}}}
""")
    worker = Worker("iv", tenant=tenant)
    seen: list[tuple[str, int, Any]] = []

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        seen.append((ctx.job.step_id, ctx.attempt, ctx.input))
        if ctx.job.step_id == "a" and ctx.attempt == 1:
            raise FatalError("a breaks the first time")
        return {"value": ctx.input.get("n", ctx.input.get("from_a"))}

    await h.start_worker(worker)
    run_id = await h.trigger(wf, {"n": 5})
    events = await h.wait_end(run_id)
    assert types(events)[-1] == "RunFailed", types(events)
    return h, run_id, events


async def test_patched_retry_asks_policy_and_approval_again_for_the_new_hash(matrix: Matrix) -> None:
    h = matrix.harness
    wf, topic = unique("patch"), unique("t")
    await h.apply(f"""
id: {wf}
version: 1
steps:
  deploy: {{topic: {topic}, require_approval: true, input: {{env: "{{{{ input.env }}}}"}}}}
""")
    calls: list[Any] = []
    worker = Worker("patch")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        calls.append(ctx.input)
        if ctx.input["env"] == "prod":
            raise FatalError("prod is frozen")
        return ctx.input

    await h.start_worker(worker)
    run_id = await h.trigger(wf, {"env": "prod"})
    await h.wait_for(run_id, lambda evs: bool(of_type(evs, "ApprovalRequested", "deploy")))
    assert (await h.decide(run_id, "deploy")).ok
    failed = await h.wait_end(run_id)
    assert types(failed)[-1] == "RunFailed"
    old_hash = of_type(failed, "StepReady", "deploy")[0]["data"]["job_hash"]

    operator = await matrix.client("operator", h.tenant)
    reply = await operator.retry_step(run_id, "deploy", reason="staging first", input={"env": "staging"})
    new_hash = reply.detail["job_hash"]
    assert new_hash != old_hash

    events = await h.wait_for(run_id, lambda evs: len(of_type(evs, "ApprovalRequested", "deploy")) == 2)
    resumed = of_type(events, "RunResumed")[0]["data"]
    assert resumed["by"] == operator.principal and resumed["steps"] == ["deploy"] and resumed["via"] == "cli"
    retried = of_type(events, "StepRetryRequested", "deploy")[0]["data"]
    assert retried["by"] == operator.principal and retried["reason"] == "staging first"
    assert retried["patched"] and retried["input"] == {"env": "staging"}
    assert (retried["job_hash"], retried["previous_job_hash"]) == (new_hash, old_hash)
    # policy decided again, for the new hash, and asked for an approval of the new hash
    decisions = of_type(events, "PolicyDecided", "deploy")
    assert [d["data"]["job_hash"] for d in decisions] == [old_hash, new_hash]
    assert of_type(events, "ApprovalRequested", "deploy")[1]["data"]["job_hash"] == new_hash

    # an approval bound to the old hash does not release the new job
    stale = await h.decide(run_id, "deploy", job_hash=old_hash)
    assert not stale.ok and "job hash" in (stale.error or ""), stale.error
    await h.settled()
    state = await h.run_state(run_id)
    assert state.run_id == run_id and state.status == "running"
    assert state.steps["deploy"].status == "awaiting_approval" and calls == [{"env": "prod"}]

    assert (await h.decide(run_id, "deploy")).ok
    seq = failed[-1]["seq"]
    events = await h.wait_for(run_id, lambda evs: ended_again(evs, seq))
    assert types(events)[-1] == "RunSucceeded"
    assert calls == [{"env": "prod"}, {"env": "staging"}]
    dispatched = of_type(events, "StepDispatched", "deploy")
    assert [d["data"]["attempt"] for d in dispatched] == [1, 2]
    assert types(events).count("RunStarted") == 1


async def test_skip_unblocks_downstream(matrix: Matrix) -> None:
    h, run_id, failed = await failing_run(matrix)
    operator = await matrix.client("operator", h.tenant)
    with pytest.raises(Refused, match="not a step of workflow"):
        await operator.skip_step(run_id, "nope", output={}, reason="typo")
    await operator.skip_step(run_id, "a", output={"value": 7}, reason="computed by hand")
    events = await h.wait_for(run_id, lambda evs: ended_again(evs, failed[-1]["seq"]))
    assert types(events)[-1] == "RunSucceeded", types(events)
    supplied = of_type(events, "StepOutputSupplied", "a")[0]["data"]
    assert supplied["by"] == operator.principal and supplied["reason"] == "computed by hand"
    assert supplied["output_hash"] == sha256_hex(canonical_json({"value": 7}))
    # b ran with the supplied output; a was never dispatched again
    b_ready = of_type(events, "StepReady", "b")
    assert len(b_ready) == 1 and b_ready[0]["data"]["input"] == {"from_a": 7}
    assert len(of_type(events, "StepDispatched", "a")) == 1
    assert events[-1]["data"]["output"] == {"b": {"value": 7}}


async def test_resume_finishes_the_same_run(matrix: Matrix) -> None:
    h, run_id, failed = await failing_run(matrix)
    operator = await matrix.client("operator", h.tenant)
    reply = await operator.resume_run(run_id, reason="the outage is over")
    assert reply.detail == {"run_id": run_id, "status": "running", "steps": ["a"]}
    events = await h.wait_for(run_id, lambda evs: ended_again(evs, failed[-1]["seq"]))
    assert types(events)[-1] == "RunSucceeded", types(events)
    assert types(events).count("RunStarted") == 1 and types(events).count("RunFailed") == 1
    order = types(events)
    assert order.index("RunFailed") < order.index("RunResumed") < order.index("StepRetryRequested")
    assert [d["data"]["attempt"] for d in of_type(events, "StepDispatched", "a")] == [1, 2]
    assert {e["run_id"] for e in events} == {run_id}
    # a run that ended otherwise stays ended
    with pytest.raises(Refused, match="only a failed run can be resumed"):
        await operator.resume_run(run_id, reason="again")
    await h.settled()
    assert (await h.run_state(run_id)).status == "succeeded"


async def test_pause_holds_dispatch_and_unpause_releases_it(matrix: Matrix) -> None:
    h = matrix.harness
    wf, topic = unique("pause"), unique("t")
    await h.apply(f"""
id: {wf}
version: 1
steps:
  first: {{topic: {topic}}}
  second: {{topic: {topic}, depends_on: [first]}}
""")
    started, release = asyncio.Event(), asyncio.Event()
    ran: list[str] = []
    worker = Worker("pause")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        ran.append(ctx.job.step_id)
        if ctx.job.step_id == "first":
            started.set()
            await release.wait()
        return {"ok": True}

    await h.start_worker(worker)
    run_id = await h.trigger(wf, {})
    await asyncio.wait_for(started.wait(), 20)
    operator = await matrix.client("operator", h.tenant)
    assert (await operator.pause_run(run_id, reason="investigating")).detail == {"run_id": run_id, "paused": True}
    with pytest.raises(Refused, match="already paused"):
        await operator.pause_run(run_id, reason="twice")
    release.set()  # the job already out finishes
    await h.wait_for(run_id, lambda evs: bool(of_type(evs, "PolicyDecided", "second")))
    await h.settled()
    events = await h.events(run_id)
    assert of_type(events, "StepSucceeded", "first") and not of_type(events, "StepDispatched", "second")
    state = await h.run_state(run_id)
    assert state.paused and state.steps["second"].status == "released" and ran == ["first"]

    await operator.unpause_run(run_id, reason="all clear")
    events = await h.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded" and ran == ["first", "second"]
    order = types(events)
    unpaused = order.index("RunUnpaused")
    assert order.index("RunPaused") < unpaused < order.index("StepDispatched", unpaused)
    assert of_type(events, "RunPaused")[0]["data"] == {"by": operator.principal, "via": "cli",
                                                       "reason": "investigating"}


async def test_feedback_is_bound_to_the_output_and_survives_a_projection_rebuild(
        matrix: Matrix, auditor: AuditorService) -> None:
    h = matrix.harness
    wf, topic = unique("fb"), unique("t")
    await h.apply(f"""
id: {wf}
version: 1
steps:
  summarize: {{topic: {topic}}}
""")
    worker = Worker("fb")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        return {"summary": "short"}

    await h.start_worker(worker)
    run_id = await h.trigger(wf, {"text": "long"})
    assert types(await h.wait_end(run_id))[-1] == "RunSucceeded"
    digest = sha256_hex(canonical_json({"summary": "short"}))

    operator = await matrix.client("operator", h.tenant)
    approver = await matrix.client("approver", h.tenant)
    with pytest.raises(Refused, match="changed since you looked"):
        await operator.give_feedback(run_id, "summarize", score=1, output_hash="0" * 64)
    reply = await operator.give_feedback(run_id, "summarize", score=2, correction={"summary": "shorter"},
                                         note="too wordy", output_hash=digest)
    assert reply.detail["output_hash"] == digest
    await approver.give_feedback(run_id, "summarize", score=5)
    viewer = await matrix.client("viewer", h.tenant)
    with pytest.raises(Refused, match="may not feedback"):
        await viewer.give_feedback(run_id, "summarize", score=0)

    async def projected() -> list[dict[str, Any]]:
        for _ in range(200):
            rows = await operator.feedback(run_id=run_id)
            if len(rows) == 2:
                return rows
            await asyncio.sleep(0.05)
        raise AssertionError(f"feedback not projected: {rows}")

    before = await projected()
    assert [(r["by"], r["score"], r["correction"], r["note"]) for r in before] == [
        (operator.principal, 2.0, {"summary": "shorter"}, "too wordy"), (approver.principal, 5.0, None, "")]
    assert all(r["output_hash"] == digest and r["output"] == {"summary": "short"} and r["workflow_id"] == wf
               for r in before)

    await auditor.rebuild()
    assert await projected() == before
    exported = await operator.feedback(workflow_id=wf)
    assert exported == before
    events = await h.events(run_id)
    assert [e["data"]["by"] for e in of_type(events, "FeedbackGiven")] == [operator.principal, approver.principal]


async def test_a_viewer_or_another_tenant_may_not_intervene(matrix: Matrix) -> None:
    h, run_id, failed = await failing_run(matrix, unique("acme"))
    viewer = await matrix.client("viewer", h.tenant)
    for act, call in (("retry", viewer.retry_step(run_id, "a", reason="mine now")),
                      ("resume", viewer.resume_run(run_id, reason="mine now"))):
        subject = s.command(h.tenant, act, viewer.principal)
        with pytest.raises(Refused, match=refused_at_once(viewer.principal, f"{act} in tenant {h.tenant}", subject)):
            await call
    assert viewer.creds is not None
    session = await matrix.watched(viewer.creds)
    subject = s.command(h.tenant, "retry", viewer.principal)
    await assert_request_dropped(session, subject, RetryStepRequest(run_id=run_id, step_id="a", reason="x")
                                 .model_dump_json().encode(), principal=viewer.principal, action="retry")

    # another tenant's operator: its own tenant has no such run; the run's tenant it may not address
    other_tenant = unique("globex")
    other: Client = await matrix.client("operator", other_tenant)
    with pytest.raises(Refused, match="not found"):
        await other.resume_run(run_id, reason="not mine")
    assert other.creds is not None
    foreign = s.command(h.tenant, "resume", other.principal)
    other_session = await matrix.watched(other.creds)
    await assert_request_dropped(other_session, foreign, RunControlRequest(run_id=run_id, reason="x")
                                 .model_dump_json().encode(), principal=other.principal, action="resume")
    await h.settled()
    assert await h.events(run_id) == failed, "a refused act wrote nothing"


async def test_the_http_api_intervenes_and_takes_feedback_as_the_keys_principal(matrix: Matrix, api: Any) -> None:
    h, run_id, failed = await failing_run(matrix)
    workflow_id = failed[0]["data"]["workflow_id"]
    base = f"/api/v1/workflow-runs/{run_id}"
    async with api.http(await api.key("viewer")) as viewer:
        r = await viewer.post(f"{base}/steps/a/skip", json={"output": {"value": 3}, "reason": "mine"})
        assert r.status_code == 403, r.text
    async with api.http(await api.key("operator", principal="olga")) as operator:
        r = await operator.post(f"{base}/steps/a/skip", json={"output": {"value": 3}})
        assert r.status_code == 422 and "reason" in r.text, r.text
        r = await operator.post(f"{base}/steps/a/skip", json={"output": {"value": 3}, "reason": "by hand"})
        assert r.status_code == 200, r.text
        events = await h.wait_for(run_id, lambda evs: ended_again(evs, failed[-1]["seq"]))
        assert types(events)[-1] == "RunSucceeded"
        supplied = of_type(events, "StepOutputSupplied", "a")[0]["data"]
        assert supplied["by"] == "olga" and supplied["via"].startswith("api:")
        r = await operator.post(f"{base}/steps/b/feedback", json={"score": 3, "note": "fine"})
        assert r.status_code == 201, r.text
        for _ in range(200):
            r = await operator.get(f"/api/v1/workflows/{workflow_id}/feedback")
            lines = [line for line in r.text.splitlines() if line]
            if lines:
                break
            await asyncio.sleep(0.05)
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert [json.loads(line)["by"] for line in lines] == ["olga"]
        listed = (await operator.get(f"{base}/feedback")).json()["items"]
        assert [(row["step_id"], row["score"], row["note"]) for row in listed] == [("b", 3.0, "fine")]


async def test_the_cli_skips_waits_and_exports_feedback(matrix: Matrix, auditor: AuditorService) -> None:
    h, run_id, failed = await failing_run(matrix)
    workflow_id = failed[0]["data"]["workflow_id"]
    no_reason = await cli(h, "step", "skip", run_id, "a", "--output", '{"value": 1}')
    assert no_reason.exit_code == 1 and "--reason: say why" in no_reason.output, no_reason.output
    done = await cli(h, "step", "skip", run_id, "a", "--output", '{"value": 1}', "--reason", "by hand", "--wait",
                     "--timeout", "30", env={"INTERLOCK_PRINCIPAL": "olga"})
    assert done.exit_code == 0, done.output
    assert f"step a of run {run_id} skipped" in done.output and f"run {run_id}: RunSucceeded" in done.output
    given = await cli(h, "feedback", run_id, "b", "--score", "4", "--correction", '{"value": 2}', "--note", "meh",
                      env={"INTERLOCK_PRINCIPAL": "olga"})
    assert given.exit_code == 0 and "recorded (output " in given.output, given.output
    for _ in range(200):
        exported = await cli(h, "feedback", "export", "--workflow", workflow_id)
        if exported.output.strip():
            break
        await asyncio.sleep(0.05)
    rows = [json.loads(line) for line in exported.output.splitlines()]
    assert [(r["run_id"], r["step_id"], r["by"], r["score"], r["correction"], r["note"]) for r in rows] == [
        (run_id, "b", "olga", 4.0, {"value": 2}, "meh")]
    listed = await cli(h, "feedback", "list", run_id, "--output", "json")
    assert [r["by"] for r in json.loads(listed.output)] == ["olga"]
