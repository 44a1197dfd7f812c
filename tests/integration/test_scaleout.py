"""Two copies of every service share the work without doing any of it twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, outcome_counts, types, unique

pytestmark = pytest.mark.integration

WIDTH = 30




async def test_two_copies_of_every_service_run_each_job_once(two_copies: Harness) -> None:
    harness = two_copies
    assert len(harness.services) == 8
    wf, topic = unique("wide"), unique("t")
    steps = "\n".join(f"  s{i}: {{topic: {topic}, input: {{i: {i}}}}}" for i in range(WIDTH))
    sources = ", ".join(f"s{i}" for i in range(WIDTH))
    await harness.apply(f"""
id: {wf}
version: 1
steps:
{steps}
  join:
    topic: {topic}
    depends_on: [{sources}]
    input: {{total: "{{{{ [{', '.join(f'steps.s{i}.output.i' for i in range(WIDTH))}] | sum }}}}"}}
""")
    executed: Counter[str] = Counter()
    by_worker: Counter[str] = Counter()

    def make(name: str) -> Worker:
        worker = Worker(name)

        @worker.job(topic)
        async def handle(ctx: JobContext) -> Any:
            executed[ctx.job_id] += 1
            by_worker[name] += 1
            await asyncio.sleep(0.01)
            return {"i": ctx.input.get("i"), "total": ctx.input.get("total")}

        return worker

    await harness.start_worker(make("left"))
    await harness.start_worker(make("right"))
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id, timeout=30)
    assert types(events)[-1] == "RunSucceeded", types(events)[-5:]
    await harness.settled()  # a duplicate dispatch or execution is in the log or in `executed` by now
    events = await harness.events(run_id)

    dispatched = [e["data"]["job_id"] for e in events if e["type"] == "StepDispatched"]
    assert len(dispatched) == len(set(dispatched)) == WIDTH + 1
    assert set(executed) == set(dispatched)
    assert all(n == 1 for n in executed.values()), [j for j, n in executed.items() if n > 1]
    counts = outcome_counts(events)
    assert len(counts) == WIDTH + 1 and all(n == 1 for n in counts.values()), counts
    assert types(events).count("RunSucceeded") == 1
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    # each step was made ready and decided exactly once, even with two planners and two policies
    for kind in ("StepReady", "PolicyDecided"):
        per_step = Counter(e["step_id"] for e in events if e["type"] == kind)
        assert set(per_step.values()) == {1} and len(per_step) == WIDTH + 1, (kind, per_step)
    state = await harness.run_state(run_id)
    assert state.steps["join"].output == {"i": None, "total": sum(range(WIDTH))}
    assert sum(by_worker.values()) == WIDTH + 1
