"""Lanes (#16): a run's priority picks the lane of its commits; each laned service has one
consumer per lane; in a process, slow-lane handlers wait while fast-lane work is pending."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from uuid import uuid4

import pytest
from nats.js.api import ConsumerConfig

from interlock.contracts import events as ev
from interlock.contracts import routing
from interlock.contracts import subjects as s
from interlock.core.run import Run
from interlock.runtime.lanes import LaneGate

pytestmark = pytest.mark.timeout(10)


def _matches(filter_subject: str, subject: str) -> bool:
    f, t = filter_subject.split("."), subject.split(".")
    for i, token in enumerate(f):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(f) == len(t)


def test_lane_of_a_priority() -> None:
    assert [routing.lane_of(p) for p in (1, 2, 3, 4, 5)] == ["slow", "slow", "slow", "fast", "fast"]
    assert routing.lane_of(None) == "slow"  # the default priority (3)
    assert routing.lane_of(0) == "slow"
    assert routing.FAST_LANE_PRIORITY == 4


def _run(priority: int | None = None, lane: str | None = None) -> Run:
    data = ev.RunStarted(workflow_id="wf", workflow_version="1", definition_hash="h", idempotency_key="k",
                         tenant="acme", priority=priority, lane=lane)
    return Run.start(uuid4(), data, datetime.now(UTC))


def test_a_run_s_lane_is_the_one_its_start_names_else_its_priority_s() -> None:
    assert _run(5).lane == "fast"
    assert _run(2).lane == "slow"
    assert _run().lane == "slow"
    # the planner names the lane from the workflow's default priority when the trigger names none
    assert _run(None, "fast").lane == "fast"
    assert _run(5, "slow").lane == "slow"


def test_the_lane_is_the_last_token_of_a_commit_and_the_run_log_still_covers_it() -> None:
    subject = s.commit_subject("acme", "run-1", "planner", routing.FLOW, s.FAST_LANE)
    assert subject == "il.evt.acme.run-1.planner.flow.fast"  # literal: the layout itself is what is pinned
    assert s.parse_run_events(subject) == ("acme", "run-1")
    assert s.log_of(subject) == s.run_events("acme", "run-1")
    assert s.run_of(subject) == ("acme", "run-1")
    assert s.lane_of_subject(subject) == "fast"
    assert _matches(s.run_log("acme", "run-1"), subject)
    assert _matches(s.EVENTS_ALL, subject)
    # a commit appended before lanes existed still parses, and counts as slow
    legacy = "il.evt.acme.run-1.planner.flow"  # literal: a subject from before lanes
    assert s.parse_run_events(legacy) == ("acme", "run-1")
    assert s.lane_of_subject(legacy) == "slow"
    with pytest.raises(s.SubjectError):
        s.commit_subject("acme", "run-1", "planner", routing.FLOW, "fa.st")
    with pytest.raises(s.SubjectError):
        s.parse_run_events("il.evt.acme.run-1.planner.flow.fast.extra")  # literal: one token too many


def test_each_laned_service_gets_a_commit_in_exactly_the_consumer_of_its_lane() -> None:
    for svc in routing.LANED:
        fast, slow = routing.consumer_filters(svc, s.FAST_LANE), routing.consumer_filters(svc, s.SLOW_LANE)
        for filters in (fast, slow):
            ConsumerConfig(filter_subjects=list(filters))
            assert len(set(filters)) == len(filters)
        for writer in routing.WRITERS:
            for route in (routing.APPROVAL, routing.AGAIN, routing.FLOW):
                both = routing.consumer_filters(svc)
                for lane in s.LANES:
                    subject = s.commit_subject("t", "r", writer, route, lane)
                    in_fast = sum(_matches(f, subject) for f in fast)
                    in_slow = sum(_matches(f, subject) for f in slow)
                    wanted = sum(_matches(f, subject) for f in both)
                    assert in_fast + in_slow == wanted <= 1, (svc, subject)  # no lane loses or doubles one
                    if wanted:
                        assert (in_fast, in_slow) == ((1, 0) if lane == s.FAST_LANE else (0, 1)), (svc, subject)
                legacy = f"il.evt.t.r.{writer}.{route}"  # literal: from before lanes (the slow consumer takes it)
                assert sum(_matches(f, legacy) for f in fast) == 0
                assert sum(_matches(f, legacy) for f in slow) == sum(_matches(f, legacy) for f in both)
    with pytest.raises(s.SubjectError):
        routing.consumer_filters("planner", "medium")


def test_the_unlaned_consumers_take_both_lanes() -> None:
    for lane in s.LANES:
        approval = s.commit_subject("t", "r", "policy", routing.APPROVAL, lane)
        assert sum(_matches(f, approval) for f in routing.consumer_filters("approval")) == 1
        flow = s.commit_subject("t", "r", "policy", routing.FLOW, lane)
        assert sum(_matches(f, flow) for f in routing.consumer_filters("auditor")) == 1


async def test_slow_work_waits_while_fast_work_is_pending() -> None:
    gate = LaneGate(max_wait=5.0)
    order: list[str] = []
    fast_started, fast_may_end = asyncio.Event(), asyncio.Event()

    async def fast() -> None:
        async with gate.lane(s.FAST_LANE):
            fast_started.set()
            await fast_may_end.wait()
            order.append("fast")

    async def slow(name: str) -> None:
        async with gate.lane(s.SLOW_LANE):
            order.append(name)

    f = asyncio.create_task(fast())
    await fast_started.wait()
    slows = [asyncio.create_task(slow(f"slow{i}")) for i in range(3)]
    await asyncio.sleep(0)  # every slow handler has reached the gate
    await asyncio.sleep(0)
    assert order == [] and gate.fast_pending == 1
    fast_may_end.set()
    await asyncio.gather(f, *slows)
    assert order == ["fast", "slow0", "slow1", "slow2"]
    assert gate.stats["slow_waited"] == 3 and gate.stats["slow_overdue"] == 0


async def test_slow_work_goes_at_once_when_no_fast_work_is_pending_and_unknown_is_slow() -> None:
    gate = LaneGate()
    async with gate.lane(None):
        pass
    async with gate.lane(s.SLOW_LANE):
        pass
    assert gate.stats["slow"] == 2 and gate.stats["slow_waited"] == 0


async def test_a_slow_handler_waits_at_most_max_wait_under_sustained_fast_work() -> None:
    gate = LaneGate(max_wait=0.05)
    release = asyncio.Event()

    async def fast() -> None:
        async with gate.fast():
            await release.wait()

    f = asyncio.create_task(fast())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await gate.slow()
    assert loop.time() - t0 >= 0.04
    assert gate.stats["slow_overdue"] == 1
    release.set()
    await f
    assert gate.fast_pending == 0


async def test_fast_work_does_not_wait_for_slow_work() -> None:
    gate = LaneGate()
    order: list[str] = []
    slow_in = asyncio.Event()
    slow_may_end = asyncio.Event()

    async def slow() -> None:
        async with gate.lane(s.SLOW_LANE):
            slow_in.set()
            await slow_may_end.wait()
            order.append("slow")

    t = asyncio.create_task(slow())
    await slow_in.wait()
    async with gate.lane(s.FAST_LANE):
        order.append("fast")
    slow_may_end.set()
    await t
    assert order == ["fast", "slow"]


def test_a_trigger_asking_for_a_high_priority_starts_in_the_fast_lane() -> None:
    from nats.aio.msg import Msg

    from interlock.contracts.messages import Trigger
    from interlock.planner.service import trigger_lane

    def msg(subject: str, data: bytes) -> Msg:
        return Msg(None, subject=subject, data=data)  # type: ignore[arg-type]

    high = Trigger(workflow_id="wf", idempotency_key="k", priority=5).model_dump_json().encode()
    low = Trigger(workflow_id="wf", idempotency_key="k", priority=2).model_dump_json().encode()
    plain = Trigger(workflow_id="wf", idempotency_key="k").model_dump_json().encode()
    assert trigger_lane(msg(s.trigger("acme", "wf"), high)) == s.FAST_LANE
    assert trigger_lane(msg(s.trigger("acme", "wf"), low)) == s.SLOW_LANE
    assert trigger_lane(msg(s.trigger("acme", "wf"), plain)) is None
    assert trigger_lane(msg(s.trigger("acme", "wf"), b'{"priority": ')) is None  # not JSON: the handler refuses it
    assert trigger_lane(msg("orders.created", b'{"priority": 5}')) is None  # a workflow's own subject: its input


async def test_started_slow_work_gives_way_at_its_checkpoint_and_nothing_else_waits_there() -> None:
    gate = LaneGate(max_wait=5.0)
    order: list[str] = []
    slow_in, fast_in, fast_may_end = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow() -> None:
        async with gate.lane(s.SLOW_LANE):
            slow_in.set()
            await fast_in.wait()  # it started before the fast work arrived
            await gate.checkpoint()  # its next run update
            order.append("slow")

    async def fast() -> None:
        async with gate.lane(s.FAST_LANE):
            fast_in.set()
            await gate.checkpoint()  # a fast handler never waits at it
            await fast_may_end.wait()
            order.append("fast")

    t_slow = asyncio.create_task(slow())
    await slow_in.wait()
    t_fast = asyncio.create_task(fast())
    await fast_in.wait()
    await gate.checkpoint()  # outside any handler (a timer, a command): no wait
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == []
    fast_may_end.set()
    await asyncio.gather(t_slow, t_fast)
    assert order == ["fast", "slow"] and gate.stats["checkpoint_waited"] == 1


async def test_a_fast_commit_seen_elsewhere_holds_slow_work_for_the_hold_and_a_newer_one_extends_it() -> None:
    gate = LaneGate(max_wait=5.0, hold_s=0.1)
    loop = asyncio.get_running_loop()
    gate.saw_fast()
    t0 = loop.time()

    async def another_fast_commit() -> None:
        await asyncio.sleep(0.05)
        gate.saw_fast()  # the run moved again: the hold now ends 0.1 s after this one

    extend = asyncio.create_task(another_fast_commit())
    async with gate.lane(s.SLOW_LANE):
        waited = loop.time() - t0
    await extend
    assert 0.14 <= waited < 1.0
    assert gate.stats["slow_waited"] == 1 and gate.stats["seen_fast"] == 2
    async with gate.lane(s.SLOW_LANE):  # the hold lapsed: at once
        pass
    assert gate.stats["slow_waited"] == 1


async def test_unheld_slow_work_and_fast_work_pass_a_hold_and_the_hold_is_capped() -> None:
    gate = LaneGate(max_wait=0.05, hold_s=10.0)
    loop = asyncio.get_running_loop()
    gate.saw_fast()
    t0 = loop.time()
    async with gate.lane(s.SLOW_LANE, held=False):  # e.g. a result that frees a slot a fast job wants
        await gate.checkpoint()  # nor does it wait at its checkpoint
    async with gate.lane(s.FAST_LANE):
        pass
    assert gate.stats["slow_waited"] == 0 and gate.stats["checkpoint_waited"] == 0
    unheld = loop.time() - t0
    async with gate.lane(s.SLOW_LANE):  # held, but never longer than max_wait
        pass
    assert gate.stats["slow_overdue"] == 1
    assert unheld < 0.05 <= loop.time() - t0 < 1.0


async def test_started_held_work_gives_way_at_its_checkpoint_to_a_fast_run_seen_meanwhile() -> None:
    gate = LaneGate(max_wait=5.0, hold_s=0.05)
    loop = asyncio.get_running_loop()
    async with gate.lane(s.SLOW_LANE):
        gate.saw_fast()  # a fast commit appended elsewhere while this handler runs
        t0 = loop.time()
        await gate.checkpoint()
        waited = loop.time() - t0
    assert waited >= 0.04 and gate.stats["checkpoint_waited"] == 1
