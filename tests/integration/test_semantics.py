"""Workflow semantics on the real services: conditions, fan-out, notifications, schemas, large
payloads, re-runs, trigger subjects and poison triggers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from interlock.contracts import headers
from interlock.contracts import subjects as s
from interlock.contracts.messages import CommandReply, Notification, PayloadRef
from interlock.core.ids import run_id_for
from interlock.runtime.registry import WorkflowRegistry
from interlock.runtime.settings import ServiceSettings
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, connect, outcome_counts, types, unique
from tests.principals import Principals

pytestmark = pytest.mark.integration


def of_type(events: list[dict[str, Any]], type_name: str, step: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_name and (step is None or e.get("step_id") == step)]


def failures(events: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """Event types with the reasons of failures, for assertion messages."""
    return [(e["type"], e.get("step_id"), e["data"].get("error") or e["data"].get("reason")) for e in events]


def dispatched_steps(events: list[dict[str, Any]]) -> list[str]:
    return [e["step_id"] for e in of_type(events, "StepDispatched")]


# -- 1. when conditions ----------------------------------------------------------------------
async def test_false_condition_skips_and_skips_propagate(harness: Harness) -> None:
    wf, topic = unique("when"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}, input: {{v: a}}}}
  b: {{topic: {topic}, depends_on: [a], when: "input.flag", input: {{v: b}}}}
  c: {{topic: {topic}, depends_on: [a], when: "not input.flag", input: {{v: c}}}}
  only_skipped: {{topic: {topic}, depends_on: [b], input: {{v: only_skipped}}}}
  chain_skipped: {{topic: {topic}, depends_on: [only_skipped], input: {{v: chain_skipped}}}}
  mixed: {{topic: {topic}, depends_on: [b, c], input: {{v: mixed, b: "{{{{ steps.b.status }}}}"}}}}
""")
    seen: list[str] = []
    inputs: dict[str, Any] = {}
    worker = Worker("when")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, str]:
        seen.append(ctx.job.step_id)
        inputs[ctx.job.step_id] = ctx.input
        return {"done": ctx.input["v"]}

    await harness.start_worker(worker)
    run_id = await harness.trigger(wf, {"flag": False})
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded", failures(events)[-4:]
    skipped = {e["step_id"]: e["data"]["reason"] for e in of_type(events, "StepSkipped")}
    assert set(skipped) == {"b", "only_skipped", "chain_skipped"}
    assert "condition is false" in skipped["b"]
    assert "every dependency was skipped" in skipped["only_skipped"]
    assert sorted(seen) == ["a", "c", "mixed"]
    assert inputs["mixed"] == {"v": "mixed", "b": "skipped"}
    state = await harness.run_state(run_id)
    assert {sid: st.status for sid, st in state.steps.items()} == {
        "a": "succeeded", "b": "skipped", "c": "succeeded", "only_skipped": "skipped",
        "chain_skipped": "skipped", "mixed": "succeeded",
    }
    # the run's output holds the succeeded sinks only
    assert state.result == {"mixed": {"done": "mixed"}}


# -- 2. for_each with max_parallel -----------------------------------------------------------
async def test_for_each_respects_max_parallel_and_keeps_order(harness: Harness) -> None:
    wf, topic = unique("fan"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  fan:
    topic: {topic}
    for_each: "input.numbers"
    max_parallel: 3
    input: {{item: "{{{{ item }}}}", index: "{{{{ index }}}}"}}
  total:
    topic: {topic}
    depends_on: [fan]
    input: {{all: "{{{{ steps.fan.output }}}}"}}
""")
    running = 0
    peak = 0
    total_input: list[Any] = []
    worker = Worker("fan", concurrency=16)

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        nonlocal running, peak
        if ctx.job.step_id == "total":
            total_input.append(ctx.input)
            return {"sum": sum(x["sq"] for x in ctx.input["all"])}
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.06)
        finally:
            running -= 1
        return {"index": ctx.input["index"], "sq": ctx.input["item"] ** 2}

    await harness.start_worker(worker)
    items = [7, 3, 11, 2, 5, 13, 1, 9, 4, 8, 6, 12]
    run_id = await harness.trigger(wf, {"numbers": items})
    events = await harness.wait_end(run_id)
    await harness.settled()
    assert types(events)[-1] == "RunSucceeded", failures(events)[-4:]
    assert peak == 3, f"peak concurrency {peak}, max_parallel is 3"
    expected = [{"index": i, "sq": x * x} for i, x in enumerate(items)]
    state = await harness.run_state(run_id)
    assert state.steps["fan"].output == expected
    assert of_type(events, "StepExpanded", "fan")[0]["data"]["count"] == 12
    assert sorted(sid for sid in dispatched_steps(events) if sid.startswith("fan")) == \
        sorted(f"fan[{i}]" for i in range(12))
    assert total_input == [{"all": expected}]
    assert state.steps["total"].output == {"sum": sum(x * x for x in items)}
    assert all(n == 1 for n in outcome_counts(events).values())


# -- 8. notify steps -------------------------------------------------------------------------
async def test_notify_step_publishes_rendered_message_once(harness: Harness) -> None:
    wf, topic, channel = unique("note"), unique("t"), unique("ch")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}, input: {{who: "{{{{ input.who }}}}"}}}}
  tell:
    type: notify
    depends_on: [a]
    channel: {channel}
    message: "hello {{{{ steps.a.output.name }}}}, run {{{{ run.workflow }}}}"
""")
    worker = Worker("note")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, str]:
        return {"name": ctx.input["who"].upper()}

    # a bare listener on the channel's subject (no Interlock role subscribes to it outside the stream)
    listener = await harness.as_custom("notify-listener", subscribe=(s.notify(harness.tenant, channel),))
    sub = await listener.subscribe(s.notify(harness.tenant, channel))
    try:
        await harness.start_worker(worker)
        run_id = await harness.trigger(wf, {"who": "ada"})
        events = await harness.wait_end(run_id)
        assert types(events)[-1] == "RunSucceeded", failures(events)[-4:]
        # a duplicate notification has been published by now, and (after the barrier's flush)
        # sits in the subscription's queue
        await harness.settled()
        received = [Notification.model_validate_json((await sub.next_msg()).data) for _ in range(sub.pending_msgs)]
    finally:
        await sub.unsubscribe()
    assert len(received) == 1, received
    note = received[0]
    assert note.message == f"hello ADA, run {wf}"
    assert (note.run_id, note.step_id, note.channel, note.workflow_id) == (run_id, "tell", channel, wf)
    # exactly one message is stored on the channel's subject, too
    info = await harness.nc.jetstream().stream_info(s.NOTIFY_STREAM, subjects_filter=s.notify(harness.tenant, channel))
    assert info.state.subjects == {s.notify(harness.tenant, channel): 1}
    state = await harness.run_state(run_id)
    assert state.steps["tell"].status == "succeeded"
    assert state.steps["tell"].output["message"] == f"hello ADA, run {wf}"


# -- 10. schemas -----------------------------------------------------------------------------
async def test_input_and_output_schema_violations_fail_without_retry(harness: Harness) -> None:
    wf_in, wf_out, topic = unique("sch-in"), unique("sch-out"), unique("t")
    schema = "{type: object, required: [n], properties: {n: {type: integer}}}"
    await harness.apply(f"""
id: {wf_in}
version: 1
steps:
  a:
    topic: {topic}
    input: {{n: "{{{{ input.n }}}}"}}
    input_schema: {schema}
    retries: {{max_attempts: 3, backoff_ms: 10}}
""")
    await harness.apply(f"""
id: {wf_out}
version: 1
steps:
  a:
    topic: {topic}
    input: {{n: "{{{{ input.n }}}}"}}
    output_schema: {schema}
    retries: {{max_attempts: 3, backoff_ms: 10}}
""")
    calls: list[str] = []
    worker = Worker("schemas")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, Any]:
        calls.append(ctx.job_id)
        return {"n": str(ctx.input["n"])}  # a string where the output schema wants an integer

    await harness.start_worker(worker)
    bad_in = await harness.trigger(wf_in, {"n": "not a number"})
    bad_out = await harness.trigger(wf_out, {"n": 5})
    events_in = await harness.wait_end(bad_in)
    events_out = await harness.wait_end(bad_out)
    await harness.settled()

    assert types(events_in)[-1] == "RunFailed"
    failed = of_type(events_in, "StepFailed", "a")
    assert len(failed) == 1 and failed[0]["data"]["final"] is True
    assert "input_schema" in failed[0]["data"]["error"]["message"]
    assert failed[0]["data"]["error"]["retryable"] is False
    assert "input_schema" in of_type(events_in, "RunFailed")[0]["data"]["reason"]
    assert "StepDispatched" not in types(events_in), "a job with an invalid input must never reach a worker"

    assert types(events_out)[-1] == "RunFailed"
    assert len(of_type(events_out, "StepDispatched", "a")) == 1
    assert "RetryScheduled" not in types(events_out)
    failed = of_type(events_out, "StepFailed", "a")
    assert len(failed) == 1 and failed[0]["data"]["final"] is True
    assert "output_schema" in failed[0]["data"]["error"]["message"]
    assert "output_schema" in of_type(events_out, "RunFailed")[0]["data"]["reason"]
    assert calls == [f"{bad_out}:a@1"]


# -- 9. large payloads -----------------------------------------------------------------------
@pytest.fixture
async def small_inline(provisioned: str, admin_creds: Path, principals: Principals) -> AsyncIterator[Harness]:
    nc = await connect(provisioned, admin_creds)
    h = Harness(url=provisioned, nc=nc, principals=principals)
    await h.start_services(settings=ServiceSettings(nats_url=provisioned, provision=False, inline_limit=1024))
    try:
        yield h
    finally:
        await h.stop()
        await nc.close()


async def test_large_output_travels_by_reference(small_inline: Harness) -> None:
    harness = small_inline
    wf, topic = unique("big"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  make: {{topic: {topic}, input: {{size: 50000}}}}
  use: {{topic: {topic}, depends_on: [make], input: {{blob: "{{{{ steps.make.output }}}}"}}}}
""")
    blob = {"text": "x" * 50_000, "tail": [1, 2, 3]}
    received: list[Any] = []
    worker = Worker("big", inline_limit=1024)

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        if ctx.job.step_id == "make":
            return blob
        received.append(ctx.input)
        return {"len": len(ctx.input["blob"]["text"])}

    await harness.start_worker(worker)
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded", failures(events)[-4:]
    made = of_type(events, "StepSucceeded", "make")[0]["data"]
    assert made["output"] is None
    ref = PayloadRef.model_validate(made["output_ref"])
    assert len(ref.sha256) == 64 and ref.size > 50_000
    assert received == [{"blob": blob}], "the next step must receive the full value"
    store = await harness.nc.jetstream().object_store(ref.object_store)
    stored = await store.get(ref.key)
    assert json.loads(stored.data or b"null") == blob
    state = await harness.run_state(run_id)
    assert state.steps["use"].output == {"len": 50_000}
    # the next step's rendered input is as large: the log keeps its reference and hash, not it
    ready = of_type(events, "StepReady", "use")[0]["data"]
    assert ready["input"] is None
    input_ref = PayloadRef.model_validate(ready["input_ref"])
    assert json.loads((await store.get(input_ref.key)).data or b"null") == {"blob": blob}


# -- 12. re-run ------------------------------------------------------------------------------
async def test_rerun_reuses_outputs_upstream_of_the_restart_step(harness: Harness) -> None:
    wf, topic = unique("rerun"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}, input: {{n: "{{{{ input.n }}}}"}}}}
  b: {{topic: {topic}, depends_on: [a], input: {{n: "{{{{ steps.a.output.n }}}}"}}}}
  c: {{topic: {topic}, depends_on: [b], input: {{n: "{{{{ steps.b.output.n }}}}"}}}}
""")
    calls: list[tuple[str, str]] = []
    worker = Worker("rerun")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, Any]:
        calls.append((ctx.job.run_id, ctx.job.step_id))
        return {"n": ctx.input["n"] + 1, "run": ctx.job.run_id}

    await harness.start_worker(worker)
    first = await harness.trigger(wf, {"n": 1})
    assert types(await harness.wait_end(first))[-1] == "RunSucceeded"
    old = await harness.run_state(first)

    # what `interlock rerun --from b` does
    workflow = await WorkflowRegistry(harness.nc.jetstream()).get(old.workflow_id, old.workflow_version)
    rerun = {"b"} | set(workflow.downstream("b"))
    reuse = {sid: st.output for sid, st in old.steps.items()
             if sid in workflow.steps and sid not in rerun and st.status == "succeeded" and st.output_ref is None}
    assert set(reuse) == {"a"}
    second = await harness.trigger(wf, old.input, key=f"rerun:{first}:b", workflow_version=workflow.version,
                                   rerun_of=first, reuse_outputs=reuse)
    events = await harness.wait_end(second)
    assert types(events)[-1] == "RunSucceeded", failures(events)[-4:]
    started = of_type(events, "RunStarted")[0]["data"]
    assert started["rerun_of"] == first
    assert started["reused_outputs"] == {"a": {"n": 2, "run": first}}
    assert dispatched_steps(events) == ["b", "c"], "a's output is reused, not recomputed"
    assert of_type(events, "StepSucceeded", "a")[0]["data"]["worker"] == "reused"
    assert [c for c in calls if c[0] == second] == [(second, "b"), (second, "c")]
    state = await harness.run_state(second)
    assert state.rerun_of == first
    assert state.steps["c"].output == {"n": 4, "run": second}


# -- 14. poison triggers ---------------------------------------------------------------------
async def test_poison_triggers_are_dead_lettered_and_the_planner_keeps_going(harness: Harness) -> None:
    wf, topic = unique("poison"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}, input: {{v: "{{{{ input.v }}}}"}}}}
""")
    worker = Worker("poison")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        return ctx.input

    await harness.start_worker(worker)
    js = harness.nc.jetstream()
    marker = uuid.uuid4().hex.encode()
    not_json = b"{this is not json " + marker
    missing = json.dumps({"workflow_id": wf, "input": {"marker": marker.decode()}}).encode()  # no idempotency_key
    dlq_before = (await js.stream_info(s.DLQ_STREAM)).state.last_seq
    await js.publish(s.trigger(harness.tenant, wf), not_json)
    await js.publish(s.trigger(harness.tenant, wf), missing)

    letters = await harness.dead_letters("planner", marker, want=2, after_seq=dlq_before)
    assert sorted(base64.b64decode(letter.data_b64) for letter in letters) == sorted([not_json, missing])
    for letter in letters:
        assert letter.service == "planner"
        assert letter.subject == s.trigger(harness.tenant, wf)
        assert "invalid trigger" in letter.reason
    by_data = {base64.b64decode(letter.data_b64): letter for letter in letters}
    assert "idempotency_key" in by_data[missing].reason

    run_id = await harness.trigger(wf, {"v": "fine"})
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded", failures(events)[-4:]
    assert (await harness.run_state(run_id)).steps["a"].output == {"v": "fine"}


@pytest.mark.parametrize(("command", "kind", "service"), [("approve", "ApprovalDecision", "approval"),
                                                           ("reject", "ApprovalDecision", "approval"),
                                                           ("cancel", "CancelRequest", "planner")])
async def test_a_malformed_command_gets_a_clear_refusal_and_is_dead_lettered(harness: Harness, command: str,
                                                                             kind: str, service: str) -> None:
    js = harness.nc.jetstream()
    nc = await harness.as_principal("alice")
    subject = s.command(harness.tenant, command, "alice")
    marker = uuid.uuid4().hex
    not_json = f"{{not json {marker}".encode()
    missing = json.dumps({"reason": marker}).encode()  # no run_id (nor step_id, job_hash, role)
    dlq_before = (await js.stream_info(s.DLQ_STREAM)).state.last_seq
    for body in (not_json, missing):
        reply = CommandReply.model_validate_json((await nc.request(subject, body, timeout=5)).data)
        assert not reply.ok
        assert reply.error is not None and f"invalid {kind}" in reply.error, reply.error
    assert reply.error is not None and "run_id" in reply.error and "Field required" in reply.error, reply.error

    letters = await harness.dead_letters(service, marker.encode(), want=2, after_seq=dlq_before)
    assert sorted(base64.b64decode(letter.data_b64) for letter in letters) == sorted([not_json, missing])
    assert {letter.subject for letter in letters} == {subject}


async def test_a_huge_poison_trigger_is_dead_lettered_once_with_its_size_and_hash(harness: Harness) -> None:
    # base64 of ~3.9 MiB exceeds the stream's max message size: a whole copy could never be stored
    wf = unique("huge")
    js = harness.nc.jetstream()
    marker = uuid.uuid4().hex.encode()
    huge = marker + b" not json " + b"x" * (3900 * 1024)
    dlq_before = (await js.stream_info(s.DLQ_STREAM)).state.last_seq
    await js.publish(s.trigger(harness.tenant, wf), huge, timeout=10)

    letters = await harness.dead_letters("planner", marker, want=2, after_seq=dlq_before, timeout=5)
    assert len(letters) == 1, letters
    letter = letters[0]
    assert letter.truncated and letter.size == len(huge)
    assert letter.sha256 == hashlib.sha256(huge).hexdigest()
    prefix = base64.b64decode(letter.data_b64)
    assert huge.startswith(prefix) and 0 < len(prefix) < len(huge)
    await harness.settled()  # every consumer of the trigger is done with it: nothing pending, nothing redelivered


# -- 15. a workflow's own trigger subject ----------------------------------------------------
async def test_workflow_trigger_subject_starts_a_run_with_the_json_as_input(harness: Harness) -> None:
    wf, topic = unique("subj"), unique("t")
    subject = f"{unique('orders')}.created"
    await harness.apply(f"""
id: {wf}
version: 1
triggers: [{subject}]
steps:
  a: {{topic: {topic}, input: {{order: "{{{{ input.order }}}}", qty: "{{{{ input.qty }}}}"}}}}
""")
    seen: list[Any] = []
    worker = Worker("subj")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        seen.append(ctx.input)
        return {"ok": True}

    await harness.start_worker(worker)
    payload = {"order": "o-17", "qty": 3, "extra": {"nested": [1, 2]}}
    msg_id = uuid.uuid4().hex
    # an external system with its own credential, allowed to publish to its subject only
    external = await harness.as_custom("orders-system", publish=(subject,))
    await external.jetstream().publish(subject, json.dumps(payload).encode(), headers={headers.MSG_ID: msg_id})
    run_id = str(run_id_for(harness.tenant, wf, msg_id))
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded", failures(events)[-4:]
    started = of_type(events, "RunStarted")[0]["data"]
    assert started["input"] == payload
    assert started["workflow_id"] == wf
    assert seen == [{"order": "o-17", "qty": 3}]
