"""Failure handling on the real services: retries with backoff, on_error, deadlines, lost workers,
late results and cancellation."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from interlock.contracts import headers
from interlock.contracts import subjects as s
from interlock.contracts.messages import CancelRequest, Heartbeat, Job, JobResult
from interlock.worker import FatalError, JobContext, RetryableError, Worker
from tests.integration.harness import Harness, outcome_counts, types, unique

pytestmark = pytest.mark.integration


def of_type(events: list[dict[str, Any]], type_name: str, step: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_name and (step is None or e.get("step_id") == step)]


def failures(events: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    return [(e["type"], e.get("step_id"), e["data"].get("error") or e["data"].get("reason")) for e in events]


def at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["at"])


# -- 3. retries ------------------------------------------------------------------------------
async def test_retryable_failures_back_off_then_succeed(harness: Harness) -> None:
    wf, topic = unique("retry"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  flaky:
    topic: {topic}
    retries: {{max_attempts: 3, backoff_ms: 100, multiplier: 2, jitter: 0}}
""")
    attempts: list[int] = []
    worker = Worker("retry")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, int]:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RetryableError("first try fails")
        if ctx.attempt == 2:
            raise ValueError("so does the second")
        return {"attempt": ctx.attempt}

    await harness.start_worker(worker)
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id)
    await harness.settled()
    assert types(events)[-1] == "RunSucceeded", failures(events)
    assert attempts == [1, 2, 3]
    retries = of_type(events, "RetryScheduled", "flaky")
    assert [(r["data"]["attempt"], r["data"]["delay_ms"]) for r in retries] == [(2, 100), (3, 200)]
    dispatched = of_type(events, "StepDispatched", "flaky")
    assert [d["data"]["attempt"] for d in dispatched] == [1, 2, 3]
    assert [d["data"]["job_id"] for d in dispatched] == [f"{run_id}:flaky@{n}" for n in (1, 2, 3)]
    for retry, next_dispatch in zip(retries, dispatched[1:], strict=True):
        due = datetime.fromisoformat(retry["data"]["due_at"])
        # no retry leaves before its backoff (the dispatcher allows 50 ms of timer skew)
        assert (at(next_dispatch) - due).total_seconds() > -0.06
        assert (at(next_dispatch) - at(retry)).total_seconds() >= retry["data"]["delay_ms"] / 1000 - 0.06
    failed = of_type(events, "StepFailed", "flaky")
    assert [(f["data"]["attempt"], f["data"]["final"]) for f in failed] == [(1, False), (2, False)]
    assert "so does the second" in failed[1]["data"]["error"]["message"]
    assert (await harness.run_state(run_id)).steps["flaky"].output == {"attempt": 3}
    assert all(n == 1 for n in outcome_counts(events).values())


async def test_exhausted_retries_fail_the_run_and_fatal_errors_do_not_retry(harness: Harness) -> None:
    wf_retry, wf_fatal, topic = unique("exhaust"), unique("fatal"), unique("t")
    for wf in (wf_retry, wf_fatal):
        await harness.apply(f"""
id: {wf}
version: 1
steps:
  doomed:
    topic: {topic}
    input: {{fatal: "{{{{ input.fatal }}}}"}}
    retries: {{max_attempts: 2, backoff_ms: 20, jitter: 0}}
  after: {{topic: {topic}, depends_on: [doomed], input: {{fatal: false}}}}
""")
    calls: list[str] = []
    worker = Worker("exhaust")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> None:
        calls.append(ctx.job_id)
        if ctx.input["fatal"]:
            raise FatalError("cannot ever work")
        raise RuntimeError("still broken")

    await harness.start_worker(worker)
    exhausted = await harness.trigger(wf_retry, {"fatal": False})
    fatal = await harness.trigger(wf_fatal, {"fatal": True})

    events = await harness.wait_end(exhausted)
    assert types(events)[-1] == "RunFailed", failures(events)
    assert [d["data"]["attempt"] for d in of_type(events, "StepDispatched", "doomed")] == [1, 2]
    assert "after" not in {e.get("step_id") for e in events}, "a failed dependency blocks its dependents"
    last = of_type(events, "StepFailed", "doomed")[-1]["data"]
    assert last["final"] is True and last["attempt"] == 2
    assert "after 2 attempts" in last["error"]["message"]
    failed_run = of_type(events, "RunFailed")[0]["data"]
    assert failed_run["step_id"] == "doomed"
    assert "step doomed failed" in failed_run["reason"] and "still broken" in failed_run["reason"]
    assert (await harness.run_state(exhausted)).status == "failed"

    events = await harness.wait_end(fatal)
    assert types(events)[-1] == "RunFailed", failures(events)
    assert len(of_type(events, "StepDispatched", "doomed")) == 1
    assert "RetryScheduled" not in types(events)
    failed = of_type(events, "StepFailed", "doomed")
    assert len(failed) == 1 and failed[0]["data"]["final"] is True
    assert failed[0]["data"]["error"]["kind"] == "fatal"
    assert failed[0]["data"]["error"]["retryable"] is False
    assert "cannot ever work" in of_type(events, "RunFailed")[0]["data"]["reason"]
    assert sorted(calls) == sorted([f"{exhausted}:doomed@1", f"{exhausted}:doomed@2", f"{fatal}:doomed@1"])


# -- 4. on_error -----------------------------------------------------------------------------
async def test_on_error_continue_lets_the_run_go_on(harness: Harness) -> None:
    wf, topic = unique("cont"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  optional: {{topic: {topic}, on_error: continue, input: {{fail: true}}}}
  next: {{topic: {topic}, depends_on: [optional], input: {{fail: false, saw: "{{{{ steps.optional.status }}}}"}}}}
""")
    worker = Worker("cont")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        if ctx.input["fail"]:
            raise FatalError("optional step broke")
        return {"saw": ctx.input["saw"]}

    await harness.start_worker(worker)
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded", failures(events)
    state = await harness.run_state(run_id)
    assert state.steps["optional"].status == "failed"
    assert state.steps["next"].output == {"saw": "failed"}


async def test_on_error_compensate_undoes_finished_steps_in_reverse(harness: Harness) -> None:
    wf, topic, undo = unique("comp"), unique("t"), unique("undo")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}, compensate: {undo}, input: {{name: a}}}}
  b: {{topic: {topic}, compensate: {undo}, depends_on: [a], input: {{name: b}}}}
  c: {{topic: {topic}, depends_on: [b], on_error: compensate, input: {{name: c}}}}
""")
    undone: list[dict[str, Any]] = []
    worker = Worker("comp")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        if ctx.input["name"] == "c":
            raise FatalError("c cannot be done")
        return {"made": ctx.input["name"]}

    @worker.job(undo)
    async def compensate(ctx: JobContext) -> Any:
        undone.append(ctx.input)
        return {"undid": ctx.input["step"]}

    await harness.start_worker(worker)
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id)
    await harness.settled()
    assert types(events)[-1] == "RunFailed", failures(events)
    assert [u["step"] for u in undone] == ["b", "a"]
    assert undone[0] == {"step": "b", "input": {"name": "b"}, "output": {"made": "b"}}
    started = of_type(events, "CompensationStarted")
    assert len(started) == 1 and started[0]["data"] == {"failed_step": "c", "steps": ["b", "a"]}
    finished = of_type(events, "CompensationFinished")
    assert len(finished) == 1 and finished[0]["data"]["ok"] is True
    comp_dispatches = [e["step_id"] for e in of_type(events, "StepDispatched") if e["step_id"].endswith("~compensate")]
    assert comp_dispatches == ["b~compensate", "a~compensate"]
    seq = types(events)
    assert seq.index("CompensationStarted") < seq.index("CompensationFinished") < seq.index("RunFailed")
    failed = of_type(events, "RunFailed")[0]["data"]
    assert failed["compensated"] is True and failed["step_id"] == "c"
    assert "c cannot be done" in failed["reason"]


# -- 5. step timeout -------------------------------------------------------------------------
async def test_deadline_times_out_the_attempt_and_the_retry_succeeds(harness: Harness) -> None:
    wf, topic = unique("slow"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  slow:
    topic: {topic}
    timeout_ms: 300
    retries: {{max_attempts: 2, backoff_ms: 20, jitter: 0}}
""")
    attempts: list[int] = []
    worker = Worker("slow")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await asyncio.sleep(3)
        return {"attempt": ctx.attempt}

    await harness.start_worker(worker)
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id, timeout=10)
    await harness.settled()
    assert types(events)[-1] == "RunSucceeded", failures(events)
    timed_out = of_type(events, "StepTimedOut", "slow")
    assert [(t["data"]["attempt"], t["data"]["reason"]) for t in timed_out] == [(1, "deadline")]
    assert [d["data"]["attempt"] for d in of_type(events, "StepDispatched", "slow")] == [1, 2]
    assert [r["data"]["attempt"] for r in of_type(events, "RetryScheduled", "slow")] == [2]
    assert attempts == [1, 2]
    assert (await harness.run_state(run_id)).steps["slow"].output == {"attempt": 2}
    assert all(n == 1 for n in outcome_counts(events).values())


# -- 6. a worker that dies mid-job -----------------------------------------------------------
async def test_lost_worker_is_detected_by_heartbeat_and_its_late_result_changes_nothing(harness: Harness) -> None:
    wf, topic = unique("lost"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  work:
    topic: {topic}
    timeout_ms: 20000
    heartbeat_timeout_ms: 600
    retries: {{max_attempts: 2, backoff_ms: 20, jitter: 0}}
""")
    js = harness.nc.jetstream()
    # the fake worker binds the durable consumer the SDK uses, with the same settings
    await js.add_consumer(s.JOBS_STREAM, ConsumerConfig(
        durable_name=s.worker_consumer(harness.tenant, topic), filter_subject=s.job(harness.tenant, topic),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30, max_ack_pending=20_000, deliver_policy=DeliverPolicy.ALL, max_deliver=-1))
    run_id = await harness.trigger(wf, {"x": 1})
    fake = (await harness.as_worker([topic])).jetstream()  # with a worker's credential
    sub = await fake.pull_subscribe_bind(s.worker_consumer(harness.tenant, topic), s.JOBS_STREAM)
    try:
        msgs = await sub.fetch(1, timeout=10)
    finally:
        await sub.unsubscribe()
    job = Job.model_validate_json(msgs[0].data)
    assert (job.run_id, job.step_id, job.attempt) == (run_id, "work", 1)
    await msgs[0].ack_sync()
    beat = Heartbeat(job_id=job.job_id, run_id=run_id, tenant=job.tenant, step_id="work", attempt=1,
                     worker="doomed-worker", progress="started")
    await fake.publish(s.heartbeat(job.tenant, run_id), beat.model_dump_json().encode())
    # ... and the fake worker is never heard of again

    events = await harness.wait_for(run_id, lambda evs: len(of_type(evs, "StepDispatched", "work")) == 2,
                                    timeout=10)
    timed_out = of_type(events, "StepTimedOut", "work")
    assert [(t["data"]["attempt"], t["data"]["reason"]) for t in timed_out] == [(1, "heartbeat")]
    first_dispatch = of_type(events, "StepDispatched", "work")[0]
    # the lease is 600 ms from the heartbeat: not much earlier, not much later
    waited = (at(timed_out[0]) - at(first_dispatch)).total_seconds()
    assert 0.55 <= waited <= 5, waited

    worker = Worker("lost")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        return {"attempt": ctx.attempt, "by": "real worker"}

    await harness.start_worker(worker)
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded", failures(events)
    assert (await harness.run_state(run_id)).steps["work"].output == {"attempt": 2, "by": "real worker"}

    late = JobResult(job_id=job.job_id, run_id=run_id, tenant=job.tenant, step_id="work", attempt=1, ok=True,
                     output={"attempt": 1, "by": "ghost"}, worker="doomed-worker")
    await fake.publish(s.result(job.tenant, run_id), late.model_dump_json().encode(),
                     headers={headers.MSG_ID: f"result:{job.job_id}"})
    await harness.wait_for(run_id, lambda evs: "LateResultRecorded" in types(evs), timeout=10)
    await harness.settled()  # a redelivered late result would be recorded by now
    events = await harness.events(run_id)
    recorded = of_type(events, "LateResultRecorded", "work")
    assert len(recorded) == 1
    assert recorded[0]["data"] == {"step_id": "work", "attempt": 1, "ok": True, "worker": "doomed-worker"}
    state = await harness.run_state(run_id)
    assert state.status == "succeeded"
    assert state.steps["work"].output == {"attempt": 2, "by": "real worker"}
    assert state.steps["work"].attempt == 2
    assert [(e["step_id"], e["data"]["attempt"]) for e in of_type(events, "StepSucceeded")] == [("work", 2)]


# -- 11. cancel ------------------------------------------------------------------------------
async def test_cancel_stops_the_running_handler_and_dispatches_nothing_more(harness: Harness) -> None:
    wf, topic = unique("cancel"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  long: {{topic: {topic}, timeout_ms: 20000}}
  after: {{topic: {topic}, depends_on: [long]}}
""")
    started = asyncio.Event()
    cancelled = asyncio.Event()
    calls: list[str] = []
    worker = Worker("cancel")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        calls.append(ctx.job.step_id)
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    await harness.start_worker(worker)
    run_id = await harness.trigger(wf, {})
    await asyncio.wait_for(started.wait(), 10)
    request = CancelRequest(run_id=run_id, reason="changed my mind")
    # who cancelled is the command subject's principal; a body naming someone else is refused
    refused = await harness.command("cancel", CancelRequest(run_id=run_id, by="mallory"), principal="tester")
    assert not refused.ok and refused.error == (
        f"the request names canceller 'mallory' but was sent as 'tester' (subject "
        f"{s.command(harness.tenant, 'cancel', 'tester')}): the canceller is taken from the subject, never from "
        f"the body")
    reply = await harness.command("cancel", request, principal="tester")
    assert reply.ok, reply.error
    await asyncio.wait_for(cancelled.wait(), 5)
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunCancelled"
    assert of_type(events, "RunCancelled")[0]["data"] == {"by": "tester", "reason": "changed my mind"}
    await harness.settled()  # a wrong dispatch or result is in the log by now
    events = await harness.events(run_id)
    assert types(events)[-1] == "RunCancelled", failures(events)
    assert [e["step_id"] for e in of_type(events, "StepDispatched")] == ["long"]
    assert calls == ["long"]
    state = await harness.run_state(run_id)
    assert state.status == "cancelled" and state.steps["long"].status == "cancelled"

    again = await harness.command("cancel", request, principal="tester")
    assert not again.ok and "already cancelled" in (again.error or "")
