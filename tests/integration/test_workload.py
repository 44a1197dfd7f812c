"""Workload control under a real nats-server with two copies of every service (issue 16):
circuit breakers (open, half-open, close; across a dispatcher restart) and canary rollouts of
agent versions (rolled back on a failing version, promoted on a healthy one)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import pytest

from interlock.client import Client
from interlock.dispatcher.service import DispatcherService
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, unique
from tests.principals import Principals

pytestmark = pytest.mark.integration

T = TypeVar("T")




@pytest.fixture
async def operator(provisioned: str, principals: Principals) -> AsyncIterator[Client]:
    async with await Client.connect(provisioned, creds=principals.person("operator"), name="workload-test") as client:
        yield client


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 20.0) -> T:
    """The first truthy value ``probe`` returns, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["at"])


async def restart_dispatchers(harness: Harness) -> None:
    """SIGKILL-like: both dispatcher copies stop, two new ones start (nothing in memory survives)."""
    old = [svc for svc in harness.services if isinstance(svc, DispatcherService)]
    for svc in old:
        await svc.stop()
        harness.services.remove(svc)
    for _ in old:
        fresh = DispatcherService(harness.service_settings("dispatcher"))
        await fresh.start()
        harness.services.append(fresh)


# -- circuit breakers ----------------------------------------------------------------------------
async def test_breaker_opens_holds_jobs_probes_and_closes_across_a_dispatcher_restart(
        two_copies: Harness, operator: Client) -> None:
    harness = two_copies
    wf, topic = unique("breaker"), unique("flaky")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  call:
    topic: {topic}
    breaker: {{failures: 3, window: 60s, cooldown: 3s}}
""")
    healthy = asyncio.Event()
    calls: list[str] = []
    worker = Worker(unique("flaky-agent"))

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        calls.append(ctx.job_id)
        if not healthy.is_set():
            raise RuntimeError("the dependency is down")
        return {"ok": True}

    await harness.start_worker(worker)
    # three failing runs in a row open the breaker
    for _ in range(3):
        run = await harness.trigger(wf, {})
        events = await harness.wait_end(run)
        assert of_type(events, "RunFailed"), [e["type"] for e in events]
    [breaker] = await eventually(lambda: _breakers_in(operator, topic, "open"), "the breaker opens")
    assert breaker.consecutive_failures == 3 and "3 consecutive failures" in breaker.reason
    assert len(calls) == 3

    # while open, new jobs are held (an event in their run), not dispatched
    held_runs = [await harness.trigger(wf, {}) for _ in range(2)]
    for run in held_runs:
        events = await harness.wait_for(run, lambda evs: bool(of_type(evs, "StepHeld")))
        [held] = of_type(events, "StepHeld")
        assert held["data"]["reason"] == "breaker_open" and held["data"]["topic"] == topic
        assert not of_type(events, "StepDispatched")

    # the breaker is durable: new dispatcher copies see it open and the held jobs' timers still fire
    healthy.set()  # the dependency heals while the breaker is still open
    await restart_dispatchers(harness)
    assert (await operator.breakers(topic))[0].state == "open"
    for run in held_runs:
        events = await harness.wait_end(run)
        assert of_type(events, "RunSucceeded"), [e["type"] for e in events]
    [closed] = await eventually(lambda: _breakers_in(operator, topic, "closed"), "the breaker closes")
    assert closed.consecutive_failures == 0 and "succeeded" in closed.reason

    # the log: closed -> open -> half_open -> closed, in order
    log = await operator.breaker_log(topic)
    assert [(c.from_state, c.to_state) for c in log] == [("closed", "open"), ("open", "half_open"),
                                                         ("half_open", "closed")]
    assert [c.seq for c in log] == [1, 2, 3]
    # half-open let exactly one job through: the other held job went only after the probe closed it
    probe_job = next(c for c in log if c.to_state == "half_open")
    dispatched = {run: of_type(await harness.events(run), "StepDispatched")[0] for run in held_runs}
    probe_run = next(run for run, e in dispatched.items() if e["data"]["job_id"] in calls[3:4])
    other = next(run for run in held_runs if run != probe_run)
    assert at(dispatched[other]) >= log[-1].at, "a second job went out while the breaker was half-open"
    assert probe_job.at <= at(dispatched[probe_run])
    assert len(calls) == 5  # 3 failures, the probe, the one held behind it: nothing ran twice


async def _breakers_in(client: Client, topic: str, state: str) -> list[Any] | None:
    found = await client.breakers(topic)
    return found if found and found[0].state == state else None


async def test_breaker_fails_fast_when_told_to(two_copies: Harness, operator: Client) -> None:
    harness = two_copies
    wf, topic = unique("fast"), unique("down")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  call:
    topic: {topic}
    breaker: {{failures: 1, cooldown: 1h, when_open: fail}}
""")
    worker = Worker(unique("down-agent"))

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        raise RuntimeError("down")

    await harness.start_worker(worker)
    await harness.wait_end(await harness.trigger(wf, {}))
    await eventually(lambda: _breakers_in(operator, topic, "open"), "the breaker opens")
    events = await harness.wait_end(await harness.trigger(wf, {}))
    [failed] = of_type(events, "StepFailed")
    assert failed["data"]["error"]["kind"] == "circuit_open" and failed["data"]["final"]
    assert not of_type(events, "StepDispatched") and of_type(events, "RunFailed")


# -- agent versions and canary rollouts -----------------------------------------------------------
def versioned_worker(topic: str, version: str, served: list[tuple[str, str, str]], *, fail: bool = False,
                     delay: float = 0.0) -> Worker:
    """A worker of ``version`` that records (job id, its version, the job's routed version)."""
    worker = Worker(unique(f"agent-v{version}"))

    @worker.job(topic, version=version)
    async def handle(ctx: JobContext) -> Any:
        served.append((ctx.job_id, version, ctx.job.agent_version))
        if delay:
            await asyncio.sleep(delay)
        if fail:
            raise RuntimeError(f"version {version} is broken")
        return {"by": version}

    return worker


async def _rollout(client: Client, topic: str, status: str) -> Any:
    found = await client.rollouts(topic)
    return found[0] if found and found[0].status == status else None


async def _run_until(harness: Harness, wf: str, done: Callable[[], Awaitable[Any]], limit: int = 60) -> list[str]:
    """Start runs one after another (each to its end) until ``done`` says so; the run ids."""
    runs = []
    for _ in range(limit):
        run = await harness.trigger(wf, {})
        runs.append(run)
        await harness.wait_end(run)
        if await done():
            return runs
    raise AssertionError(f"not done after {limit} runs")


async def _until_live(client: Client, topic: str, versions: set[str], patience: float = 15.0) -> None:
    """Until the registry lists a worker of each version (a busy server may answer a listing late)."""
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        live = {a.version for a in await client.agents() if a.topic == topic}
        if versions <= live:
            return
        assert asyncio.get_running_loop().time() < deadline, f"versions live for {topic}: {sorted(live)}"
        await asyncio.sleep(0.1)


async def _routes(harness: Harness, runs: list[str]) -> list[dict[str, Any]]:
    return [e["data"] for run in runs for e in of_type(await harness.events(run), "StepDispatched")]


async def test_a_canary_of_a_failing_version_is_rolled_back(two_copies: Harness, operator: Client) -> None:
    harness = two_copies
    wf, topic = unique("canary"), unique("summarize")
    await harness.apply(f"id: {wf}\nversion: 1\nsteps:\n  call: {{topic: {topic}}}\n")
    served: list[tuple[str, str, str]] = []
    await harness.start_worker(versioned_worker(topic, "1.4", served))
    await harness.start_worker(versioned_worker(topic, "2.0", served, fail=True))
    await _until_live(operator, topic, {"1.4", "2.0"})
    rollout = await operator.rollout_start(topic, "2.0", 0.5, min_jobs=3, window_s=600)
    assert (rollout.stable, rollout.canary, rollout.status) == ("1.4", "2.0", "active")

    runs = await _run_until(harness, wf, lambda: _rollout(operator, topic, "rolled_back"))
    [ended] = await operator.rollouts(topic)
    assert ended.canary_stats.jobs >= 3 and ended.canary_stats.failures == ended.canary_stats.jobs
    assert "failure rate" in ended.reason and ended.decided_by == "dispatcher"
    routes = await _routes(harness, runs)
    # the share is by a hash of each (random) job id: the stable side may get none before three
    # canary jobs have failed, so only the canary's routing is certain here (stable is checked below)
    seen = {(r["agent_version"], r["route"]) for r in routes}
    assert ("2.0", "canary") in seen and seen <= {("1.4", "stable"), ("2.0", "canary")}
    # every job reached a worker of the version it was routed to, and only that one
    assert served and all(mine == routed for _, mine, routed in served)

    # rolled back: every new job goes to the stable version, and succeeds
    after = [await harness.trigger(wf, {}) for _ in range(4)]
    for run in after:
        assert of_type(await harness.wait_end(run), "RunSucceeded")
    assert {(r["agent_version"], r["route"]) for r in await _routes(harness, after)} == {("1.4", "stable")}
    assert all(mine == routed for _, mine, routed in served)


async def test_a_healthy_canary_is_promoted(two_copies: Harness, operator: Client) -> None:
    harness = two_copies
    wf, topic = unique("promote"), unique("classify")
    await harness.apply(f"id: {wf}\nversion: 1\nsteps:\n  call: {{topic: {topic}}}\n")
    served: list[tuple[str, str, str]] = []
    await harness.start_worker(versioned_worker(topic, "1", served))
    await harness.start_worker(versioned_worker(topic, "2", served))
    await _until_live(operator, topic, {"1", "2"})
    await operator.rollout_start(topic, "2", 0.5, min_jobs=3, window_s=1.0, max_latency_ratio=20)

    runs = await _run_until(harness, wf, lambda: _rollout(operator, topic, "promoted"))
    [promoted] = await operator.rollouts(topic)
    assert promoted.canary_stats.jobs >= 3 and promoted.canary_stats.failures == 0
    assert {r["route"] for r in await _routes(harness, runs)} == {"stable", "canary"}

    after = [await harness.trigger(wf, {}) for _ in range(4)]
    for run in after:
        assert of_type(await harness.wait_end(run), "RunSucceeded")
    assert {r["agent_version"] for r in await _routes(harness, after)} == {"2"}
    assert all(mine == routed for _, mine, routed in served)

    # cleared: jobs go to any worker again (unversioned, as the Node conformance worker takes them)
    await operator.rollout_clear(topic)
    await asyncio.sleep(1.1)  # the dispatchers read a topic's rollout at most once a second
    run = await harness.trigger(wf, {})
    assert of_type(await harness.wait_end(run), "RunSucceeded")
    assert {r.get("agent_version", "") for r in await _routes(harness, [run])} == {""}


async def test_a_step_version_range_waits_for_a_fitting_worker(two_copies: Harness) -> None:
    harness = two_copies
    wf, topic = unique("ranged"), unique("extract")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  call: {{topic: {topic}, agent_version: ">=2,<3"}}
""")
    served: list[tuple[str, str, str]] = []
    await harness.start_worker(versioned_worker(topic, "1.9", served))
    run = await harness.trigger(wf, {})
    events = await harness.wait_for(run, lambda evs: bool(of_type(evs, "StepHeld")))
    assert of_type(events, "StepHeld")[0]["data"]["reason"] == "no_agent_version"
    await harness.start_worker(versioned_worker(topic, "2.3", served))
    await harness.start_worker(versioned_worker(topic, "3.0", served))
    events = await harness.wait_end(run, timeout=30)
    assert of_type(events, "RunSucceeded")
    [dispatched] = of_type(events, "StepDispatched")
    assert (dispatched["data"]["agent_version"], dispatched["data"]["route"]) == ("2.3", "range")
    assert [(mine, routed) for _, mine, routed in served] == [("2.3", "2.3")]
