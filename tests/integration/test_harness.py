"""The harness's barrier: it must not pass while a message is unhandled or a handler still runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from interlock.contracts import subjects as s
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique

pytestmark = pytest.mark.integration


async def test_settled_waits_for_running_handlers_and_undelivered_jobs(harness: Harness) -> None:
    wf, topic = unique("barrier"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  hold: {{topic: {topic}}}
""")
    release = asyncio.Event()
    entered: list[str] = []
    worker = Worker("barrier", concurrency=1)  # one job at a time: the second waits on the server

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        entered.append(ctx.job.run_id)
        await release.wait()
        return {}

    await harness.start_worker(worker)
    first = await harness.trigger(wf, {})
    second = await harness.trigger(wf, {})
    await harness.wait_for(first, lambda evs: "StepDispatched" in types(evs))
    await harness.wait_for(second, lambda evs: "StepDispatched" in types(evs))

    # the handler is blocked on an event only this test sets, so the barrier cannot be reached:
    # its timeout here is the failure being tested, not a guess at how long something takes
    with pytest.raises(AssertionError) as refused:
        await harness.settled(timeout=1.0)
    message = str(refused.value)
    consumer = s.worker_consumer(harness.tenant, topic)
    assert f"{consumer} on {s.JOBS_STREAM}: 1 handler(s) running" in message, message
    assert f"{consumer} on {s.JOBS_STREAM}: ack floor" in message and "1 undelivered" in message, message
    assert len(entered) == 1

    release.set()
    await harness.wait_end(first)
    await harness.wait_end(second)
    await harness.settled()
    assert sorted(entered) == sorted([first, second])
