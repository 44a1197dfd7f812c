"""Sensitive values that reach the services in clear (a trigger not sent by the Client, a result
from a worker that does not seal) are sealed before they are recorded; the agent still gets them
in clear, and the run's log and the job stream hold only envelopes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from interlock.contracts import subjects as s
from interlock.core.natsserver import EmbeddedNats
from interlock.core.sealed import SEALED, contains_sealed
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique

pytestmark = pytest.mark.integration


def _stored_bytes(server: EmbeddedNats, *streams: str) -> bytes:
    """The raw bytes the server keeps for ``streams`` (acknowledged work-queue messages included,
    until the store compacts them)."""
    return b"".join(f.read_bytes() for stream in streams for d in server.store_dir.rglob(stream) if d.is_dir()
                    for f in d.rglob("*") if f.is_file())


async def test_clear_trigger_and_clear_result_are_sealed_before_they_are_stored(harness: Harness,
                                                                                nats_server: EmbeddedNats) -> None:
    wf, topic = unique("sens"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
sensitive: [steps.a.output.session]
steps:
  a: {{topic: {topic}, input: {{password: "{{{{ input.password }}}}", n: "{{{{ input.n }}}}"}}}}
""")
    seen: list[Any] = []
    worker = Worker("sens")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, Any]:
        seen.append(ctx.input)
        return {"session": "session-clear-42", "api_key": "key-clear-42", "n": ctx.input["n"]}

    await harness.start_worker(worker)
    # a worker that does not seal (as one in another language might not): its result travels in clear
    worker._sealer.seal_tree = lambda tenant, run, value, root, paths=(): value  # type: ignore[method-assign]
    run_id = await harness.trigger(wf, {"password": "pw-clear-42", "n": 1})  # a Trigger, not sealed by a Client
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded", types(events)
    assert seen == [{"password": "pw-clear-42", "n": 1}]  # the agent got the clear value

    started = events[0]["data"]
    assert started["input"]["n"] == 1 and started["input"]["password"][SEALED]["run"] == run_id
    succeeded = next(e["data"] for e in events if e["type"] == "StepSucceeded")
    assert succeeded["output"]["n"] == 1
    assert contains_sealed(succeeded["output"]["session"]) and contains_sealed(succeeded["output"]["api_key"])
    log = json.dumps(events).encode()
    for clear in (b"pw-clear-42", b"session-clear-42", b"key-clear-42"):
        assert clear not in log
    # the trigger and the result streams held them in clear (their senders did not seal); the run's
    # log and the job stream never did
    stored = _stored_bytes(nats_server, s.EVENTS_STREAM, s.JOBS_STREAM)
    assert run_id.encode() in stored  # the scan sees this run
    for clear in (b"pw-clear-42", b"session-clear-42", b"key-clear-42"):
        assert clear not in stored


async def test_a_large_output_goes_to_the_object_store_sealed(harness: Harness, nats_server: EmbeddedNats) -> None:
    wf, topic = unique("sensbig"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}, input: {{n: 1}}}}
""")
    worker = Worker("sensbig", inline_limit=64)  # any output over 64 bytes: the object store

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, Any]:
        return {"auth": {"Authorization": "Bearer big-clear-77"}, "filler": "x" * 200}

    await harness.start_worker(worker)
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded", types(events)
    succeeded = next(e["data"] for e in events if e["type"] == "StepSucceeded")
    assert succeeded["output"] is None and succeeded["output_ref"] is not None
    state = await harness.run_state(run_id)
    assert state.steps["a"].output_ref is not None
    stored = _stored_bytes(nats_server, f"OBJ_{s.PAYLOADS_OBJECT_STORE}", s.RESULTS_STREAM)
    assert b"x" * 200 in stored  # the scan sees the object
    assert b"big-clear-77" not in stored
