"""A → (B, C) → D → E on the real services, end to end."""

from __future__ import annotations

import asyncio
import time

import pytest

from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, outcome_counts, types, unique

pytestmark = pytest.mark.integration


def five_step(wf_id: str, topic: str) -> str:
    return f"""
id: {wf_id}
version: 1
steps:
  a: {{topic: {topic}, input: {{n: "{{{{ input.n }}}}"}}}}
  b: {{topic: {topic}, depends_on: [a], input: {{n: "{{{{ steps.a.output.n }}}}"}}}}
  c: {{topic: {topic}, depends_on: [a], input: {{n: "{{{{ steps.a.output.n }}}}"}}}}
  d: {{topic: {topic}, depends_on: [b, c], input: {{n: "{{{{ steps.b.output.n + steps.c.output.n }}}}"}}}}
  e: {{topic: {topic}, depends_on: [d], input: {{n: "{{{{ steps.d.output.n }}}}"}}}}
"""


async def test_five_step_dag_runs_with_parallel_branch(harness: Harness) -> None:
    wf, topic = unique("five"), unique("t")
    await harness.apply(five_step(wf, topic))
    running = 0
    peak = 0
    worker = Worker("five")

    @worker.job(topic)
    async def add_one(ctx: JobContext) -> dict[str, int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.1 if ctx.job.step_id in ("b", "c") else 0)
        running -= 1
        return {"n": int(ctx.input["n"]) + 1}

    await harness.start_worker(worker)
    run_id = await harness.trigger(wf, {"n": 1})
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded", types(events)
    state = await harness.run_state(run_id)
    # a: 2, b: 3, c: 3, d: 7, e: 8
    assert state.steps["e"].output == {"n": 8}
    assert peak == 2, "b and c must run at the same time"
    assert all(n == 1 for n in outcome_counts(events).values())
    # every job was allowed by policy before it was dispatched
    for step in "abcde":
        seq = types(events, step)
        assert seq.index("PolicyDecided") < seq.index("StepDispatched")

    # wall time of a warm run, printed for the record (not asserted: shared machines are noisy)
    t0 = time.perf_counter()
    run_id = await harness.trigger(wf, {"n": 1})
    await harness.wait_end(run_id)
    print(f"\nwarm 5-step run with 100 ms parallel branch: {(time.perf_counter() - t0) * 1000:.0f} ms")


async def test_same_idempotency_key_starts_one_run(harness: Harness) -> None:
    wf, topic = unique("idem"), unique("t")
    await harness.apply(five_step(wf, topic))
    calls: list[str] = []
    worker = Worker("idem")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, int]:
        calls.append(ctx.job_id)
        return {"n": 1}

    await harness.start_worker(worker)
    ids = {await harness.trigger(wf, {"n": 1}, key="same-key") for _ in range(5)}
    assert len(ids) == 1
    run_id = ids.pop()
    events = await harness.wait_end(run_id)
    assert types(events).count("RunStarted") == 1
    await harness.settled()
    assert len(calls) == len(set(calls)) == 5
