"""The reconciler moves on runs whose timers or messages were lost."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from interlock.contracts import events as ev
from interlock.core.codec import job_hash
from interlock.core.ids import job_id
from interlock.core.run import Run
from interlock.dispatcher.service import DispatcherService
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique

pytestmark = pytest.mark.integration


async def test_sweep_times_out_an_attempt_whose_deadline_timer_was_lost(harness: Harness) -> None:
    wf, topic = unique("lost-timer"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}, retries: {{max_attempts: 2, backoff_ms: 50}}}}
""")
    worker = Worker("lost-timer")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, int]:
        return {"attempt": ctx.attempt}

    # a run written straight into the log, as if its dispatcher died after appending
    # StepDispatched and before publishing the job or scheduling its deadline
    run_id = uuid.uuid4()
    store = harness.store
    started = ev.RunStarted(workflow_id=wf, workflow_version="1", definition_hash="x" * 64,
                            idempotency_key=run_id.hex, tenant=harness.tenant)
    await store.start_run(run_id, started, lambda run: run.admit(ev.RunAdmitted(snapshot_id="test@0")))
    jh = job_hash(workflow_id=wf, workflow_version="1", step_id="a", topic=topic, input=None)

    # each event signed by the service that writes it: the others refuse any other writer
    await store.update(harness.tenant, str(run_id), lambda run: run.mark_step_ready(
        ev.StepReady(step_id="a", topic=topic, job_hash=jh)))
    decided, _ = await harness.store_as("policy").update(harness.tenant, str(run_id), lambda run: run.decide_policy(
        ev.PolicyDecided(step_id="a", decision="allow", snapshot_id="test@0", job_hash=jh)))
    as_dispatcher = harness.store_as("dispatcher")
    as_dispatcher._remember(decided)  # appends right after, no read: before the running dispatcher can

    def lost(run: Run) -> None:
        run.dispatch_step(ev.StepDispatched(step_id="a", attempt=1, job_id=job_id(str(run_id), "a", 1), topic=topic,
                                            deadline=datetime.now(UTC) - timedelta(seconds=30)))

    # the running dispatcher sees the commit and re-publishes the job, but nothing schedules the
    # deadline that already passed: only the sweep notices it
    await as_dispatcher.update(harness.tenant, str(run_id), lost)
    dispatcher = next(s for s in harness.services if isinstance(s, DispatcherService))
    await dispatcher.sweep()
    events = await harness.wait_for(str(run_id), lambda evs: "StepTimedOut" in types(evs), timeout=10)
    timed_out = [e for e in events if e["type"] == "StepTimedOut"]
    assert timed_out[0]["data"] == {"step_id": "a", "attempt": 1, "reason": "deadline"}
    # the retry goes out and a worker finishes it
    await harness.start_worker(worker)
    events = await harness.wait_end(str(run_id))
    assert types(events)[-1] == "RunSucceeded"
    succeeded = [e for e in events if e["type"] == "StepSucceeded"]
    assert [e["data"]["attempt"] for e in succeeded] == [2]
