"""Lanes under a real nats-server (#16): with a backlog of low-priority runs queued in a service's
slow lane, a high-priority run's commit, appended after the whole backlog, is planned, decided and
dispatched before the backlog drains. The order is read from the log (stream sequences of the
commits), never from timings: each service is started only once its backlog is queued."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from interlock.contracts import subjects as s
from interlock.runtime.service import Service
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, connect, service_classes, unique

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BACKLOG = 200


async def start(h: Harness, name: str) -> Service:
    if h.writer is None and h.principals is not None:
        h.writer = await connect(h.url, h.principals.service("planner"), h.tls)
    [cls] = [c for c in service_classes() if c.name == name]
    service = cls(h.service_settings(name))
    await service.start()
    h.services.append(service)
    return service


async def stop(h: Harness, service: Service) -> None:
    await service.stop()
    h.services.remove(service)


async def first_seq(h: Harness, run_id: str, kind: str) -> int | None:
    """The stream sequence of the run's first commit holding an event of ``kind``."""
    for commit in await h.store.read_commits(h.tenant, run_id):
        if any(e["type"] == kind for e in commit.envelopes):
            return commit.stream_seq
    return None


async def all_reached(h: Harness, runs: list[str], kind: str, timeout: float = 120.0) -> dict[str, int]:
    """Wait until every run's log holds ``kind``; run id -> the sequence of that commit."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        seqs = await asyncio.gather(*(first_seq(h, r, kind) for r in runs))
        if all(q is not None for q in seqs):
            return {r: q for r, q in zip(runs, seqs, strict=True) if q is not None}
        if loop.time() > deadline:
            missing = sum(q is None for q in seqs)
            raise AssertionError(f"{missing} of {len(runs)} runs have no {kind} within {timeout}s")
        await asyncio.sleep(0.2)


def place(seqs: dict[str, int], run: str) -> int:
    """How many runs reached the point before ``run`` did."""
    return sorted(seqs.values()).index(seqs[run])


async def test_a_fast_lane_run_overtakes_a_queued_slow_lane_backlog_in_every_service(bare: Harness) -> None:
    wf, topic = unique("lanes"), unique("t")
    await bare.apply(f"id: {wf}\nversion: 1\npriority: 1\nsteps:\n  work: {{topic: {topic}}}\n")
    planner = await start(bare, "planner")
    lows = [await bare.trigger(wf, {"n": n}) for n in range(BACKLOG)]  # the workflow's priority: 1
    high = await bare.trigger(wf, {"n": -1}, priority=5)
    runs = [*lows, high]
    # the planner takes triggers in order: the high run is planned last, after the whole backlog
    planned = await all_reached(bare, runs, "StepReady")
    assert place(planned, high) == BACKLOG
    head = (await bare.store.read_commits(bare.tenant, high))[0]
    assert head.envelopes[0]["data"]["lane"] == s.FAST_LANE
    assert (await bare.store.read_commits(bare.tenant, lows[0]))[0].envelopes[0]["data"]["lane"] == s.SLOW_LANE
    await stop(bare, planner)

    # policy: the backlog's StepReady commits wait in its slow consumer, the high run's in the fast one
    await start(bare, "policy")
    decided = await all_reached(bare, runs, "PolicyDecided")
    assert place(decided, high) < BACKLOG // 5, f"decided after {place(decided, high)} of {BACKLOG} backlog runs"

    # dispatcher: the same with the policy's decisions
    worker = Worker("lanes")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, Any]:
        return {"ok": True}

    await bare.start_worker(worker)
    await start(bare, "dispatcher")
    dispatched = await all_reached(bare, runs, "StepDispatched")
    assert place(dispatched, high) < BACKLOG // 5, \
        f"dispatched after {place(dispatched, high)} of {BACKLOG} backlog runs"
    await all_reached(bare, runs, "StepSucceeded")

    # planner again: the dispatcher's StepSucceeded commits; the run's end is planned first for the high run
    await start(bare, "planner")
    ended = await all_reached(bare, runs, "RunSucceeded")
    assert place(ended, high) < BACKLOG // 5, f"ended after {place(ended, high)} of {BACKLOG} backlog runs"
    # every commit of the high run is in the fast lane, every commit of a backlog run in the slow one
    js = bare.nc.jetstream()
    info = await js.stream_info(s.EVENTS_STREAM, subjects_filter=s.run_log(bare.tenant, high))
    assert info.state.subjects and all(subj.endswith(".fast") for subj in info.state.subjects)
    info = await js.stream_info(s.EVENTS_STREAM, subjects_filter=s.run_log(bare.tenant, lows[0]))
    assert info.state.subjects and all(subj.endswith(".slow") for subj in info.state.subjects)


async def test_every_service_sees_each_fast_lane_commit_and_no_slow_one(bare: Harness) -> None:
    """The cross-process half of the lanes: each service's core subscription to the fast-lane
    commits (its permissions allow it) counts exactly the high run's commits, not a low run's."""
    wf, topic = unique("sig"), unique("t")
    await bare.apply(f"id: {wf}\nversion: 1\npriority: 1\nsteps:\n  work: {{topic: {topic}}}\n")

    worker = Worker("signal")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, Any]:
        return {"ok": True}

    await bare.start_worker(worker)
    services = [await start(bare, cls.name) for cls in service_classes()]
    low = await bare.trigger(wf, {"n": 1})
    high = await bare.trigger(wf, {"n": 2}, priority=5)
    await all_reached(bare, [low, high], "RunSucceeded")
    fast_commits = len(await bare.store.read_commits(bare.tenant, high))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    seen = {svc.name: svc.lanes.stats["seen_fast"] for svc in services}
    while any(n < fast_commits for n in seen.values()) and loop.time() < deadline:
        await asyncio.sleep(0.05)  # core messages may trail the last commit's read by a moment
        seen = {svc.name: svc.lanes.stats["seen_fast"] for svc in services}
    assert seen == {svc.name: fast_commits for svc in services}
