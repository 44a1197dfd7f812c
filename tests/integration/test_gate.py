"""Workload control under a real nats-server with two copies of every service (#16): priority order
when a topic is saturated, fair share between tenants, a concurrency limit that holds at every
instant (read from the log) while a dispatcher copy is SIGKILLed, and a rate limit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from interlock.client import Client
from interlock.core.inflight import peak_in_flight
from interlock.core.workflow import Rate
from interlock.core.workload import GateLimits, ScopeLimits
from interlock.dispatcher.service import DispatcherService
from interlock.runtime.settings import ServiceSettings
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, connect, service_classes, types, unique
from tests.principals import Principals

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["at"])


def max_in_flight(logs: Iterable[list[dict[str, Any]]]) -> int:
    """The most jobs in flight at any instant, read from the run logs (interlock.core.inflight)."""
    return max(peak_in_flight(logs).values(), default=0)


def dispatched_at(events: list[dict[str, Any]]) -> datetime:
    return at(next(e for e in events if e["type"] == "StepDispatched"))


def one_step(wf: str, topic: str, extra: str = "") -> str:
    return f"id: {wf}\nversion: 1\n{extra}steps:\n  work: {{topic: {topic}, input: {{n: '{{{{ input.n }}}}'}}}}\n"


def settings_with(harness: Harness, limits: GateLimits, **values: Any) -> ServiceSettings:
    return ServiceSettings(nats_url=harness.url, provision=False, sweep_interval=0, gate_limits=limits, **values)


def blocking_worker(name: str, topic: str, opened: asyncio.Event, tenant: str | None = None) -> Worker:
    """Every job waits until ``opened`` is set: the first job holds the topic's only slot."""
    worker = Worker(name, tenant=tenant)

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, Any]:
        await opened.wait()
        return {"n": ctx.input.get("n")}

    return worker


async def throttled(h: Harness, run_id: str) -> None:
    await h.wait_for(run_id, lambda evs: "StepThrottled" in types(evs), timeout=30)


async def test_under_saturation_the_high_priority_run_is_dispatched_first(bare: Harness) -> None:
    wf, topic = unique("prio"), unique("t")
    await bare.start_services(copies=2, settings=settings_with(
        bare, GateLimits(topics={topic: ScopeLimits(concurrency=1)})))
    await bare.apply(one_step(wf, topic))
    opened = asyncio.Event()
    await bare.start_worker(blocking_worker("w", topic, opened))
    first = await bare.trigger(wf, {"n": 0}, priority=1)
    await bare.wait_for(first, lambda evs: "StepDispatched" in types(evs))
    lows = []
    for n in range(1, 4):
        lows.append(await bare.trigger(wf, {"n": n}, priority=1))
        await throttled(bare, lows[-1])
    high = await bare.trigger(wf, {"n": 9}, priority=5)
    await throttled(bare, high)
    events = await bare.events(high)
    [throttle] = [e for e in events if e["type"] == "StepThrottled"]
    assert throttle["data"]["priority"] == 5 and throttle["data"]["scope"] == f"concurrency topic:{topic}"

    opened.set()
    logs = {run: await bare.wait_end(run, timeout=30) for run in [first, *lows, high]}
    assert all(types(evs)[-1] == "RunSucceeded" for evs in logs.values())
    assert all(dispatched_at(logs[high]) < dispatched_at(logs[low]) for low in lows), \
        "the high-priority run waited behind low-priority ones"
    assert max_in_flight(logs.values()) == 1


async def test_a_burst_of_one_tenant_does_not_starve_another(bare: Harness) -> None:
    wf, topic = unique("fair"), unique("t")
    await bare.start_services(copies=2, settings=settings_with(
        bare, GateLimits(topics={topic: ScopeLimits(concurrency=1)})))
    await bare.apply(one_step(wf, topic))
    tenant_b = unique("globex")
    in_b = dataclasses.replace(bare, tenant=tenant_b)
    opened = asyncio.Event()
    await bare.start_worker(blocking_worker("a", topic, opened))
    await bare.start_worker(blocking_worker("b", topic, opened, tenant=tenant_b))
    first = await bare.trigger(wf, {"n": 0})
    await bare.wait_for(first, lambda evs: "StepDispatched" in types(evs))
    burst = [await bare.trigger(wf, {"n": n}) for n in range(1, 9)]
    for run in burst:
        await throttled(bare, run)
    late = await in_b.trigger(wf, {"n": 100})
    await throttled(in_b, late)

    opened.set()
    logs = {run: await bare.wait_end(run, timeout=30) for run in burst}
    b_events = await in_b.wait_end(late, timeout=30)
    order = sorted([(dispatched_at(evs), "a") for evs in logs.values()] + [(dispatched_at(b_events), "b")])
    # first come, first served would hand tenant B the slot ninth, after the whole burst
    assert [who for _, who in order].index("b") <= 1, order
    assert max_in_flight([*logs.values(), b_events]) == 1


async def test_a_rate_limit_spaces_dispatches(bare: Harness) -> None:
    wf, topic = unique("rate"), unique("t")
    per_s, burst, runs = 5.0, 2, 10
    await bare.start_services(copies=2, settings=settings_with(
        bare, GateLimits(topics={topic: ScopeLimits(rate=Rate(per_s=per_s, burst=burst))})))
    await bare.apply(one_step(wf, topic))
    opened = asyncio.Event()
    opened.set()
    await bare.start_worker(blocking_worker("w", topic, opened))
    run_ids = await asyncio.gather(*(bare.trigger(wf, {"n": n}) for n in range(runs)))
    logs = [await bare.wait_end(run, timeout=60) for run in run_ids]
    assert all(types(evs)[-1] == "RunSucceeded" for evs in logs)
    times = sorted(dispatched_at(evs) for evs in logs)
    start = times[0]
    for k, when in enumerate(times):
        # a full bucket lets `burst` go at once; every later job waits for a token (1/per_s each)
        earliest = max(0.0, (k - burst + 1) / per_s)
        assert (when - start).total_seconds() >= earliest - 0.02, (k, [(t - start).total_seconds() for t in times])
    assert sum("StepThrottled" in types(evs) for evs in logs) >= runs - burst - 1


async def test_backpressure_bounds_the_queue_of_a_topic_without_workers(bare: Harness, principals: Principals) -> None:
    wf, topic, bound, runs = unique("bp"), unique("t"), 2, 5
    await bare.start_services(copies=2, settings=settings_with(bare, GateLimits(max_in_flight=bound)))
    await bare.apply(one_step(wf, topic))
    run_ids = [await bare.trigger(wf, {"n": n}, priority=1 + n % 5) for n in range(runs)]
    logs = [await bare.wait_for(run, lambda evs: bool({"StepDispatched", "StepThrottled"} & set(types(evs))))
            for run in run_ids]
    await bare.settled()
    logs = [await bare.events(run) for run in run_ids]
    queued = [evs for evs in logs if "StepDispatched" in types(evs)]
    held = [evs for evs in logs if "StepDispatched" not in types(evs)]
    # two copies may each publish up to the bound before either reads the queue again
    assert bound <= len(queued) <= 2 * bound, [types(evs) for evs in logs]
    assert held and all(e["data"]["scope"] == "backpressure" for evs in held for e in evs
                        if e["type"] == "StepThrottled")
    operator = principals.person("operator", "default", name=unique("op"))
    async with await Client.connect(bare.url, creds=operator) as client:
        assert (await client.queue_depth()).get(topic) == len(queued)
    opened = asyncio.Event()
    opened.set()
    await bare.start_worker(blocking_worker("late", topic, opened))
    ends = [await bare.wait_end(run, timeout=30) for run in run_ids]  # the held ones go as the queue drains
    assert all(types(evs)[-1] == "RunSucceeded" for evs in ends)


async def test_a_job_released_while_the_gate_decides_on_its_run_waits_for_a_slot(
        bare: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drill's violation, step by step: the dispatcher's decide admits the jobs due when it
    begins (left: throttled), and while its gate round trip is out an approval releases another
    job of the same run (right). That commit must not change the run under the decide: right
    goes through the gate too, and waits, instead of being dispatched beside the job that holds
    the only slot."""
    wf, blocker_wf, topic = unique("mid"), unique("blk"), unique("t")
    await bare.start_services(settings=settings_with(bare, GateLimits(topics={topic: ScopeLimits(concurrency=1)})))
    await bare.apply(one_step(blocker_wf, topic))
    await bare.apply(f"""
id: {wf}
version: 1
steps:
  left: {{topic: {topic}, input: {{n: 1}}}}
  right: {{topic: {topic}, require_approval: true, input: {{n: 2}}}}
""")
    opened = asyncio.Event()
    await bare.start_worker(blocking_worker("w", topic, opened))
    blocker = await bare.trigger(blocker_wf, {"n": 0})
    await bare.wait_for(blocker, lambda evs: "StepDispatched" in types(evs))  # it holds the slot

    [dispatcher] = [svc for svc in bare.services if isinstance(svc, DispatcherService)]
    admitting, go_on, delivered = asyncio.Event(), asyncio.Event(), asyncio.Event()
    real_admit, real_observe = dispatcher.gatekeeper.admit, dispatcher.store.observe

    async def admit(job: str, waiter: Any, limits: Any) -> Any:
        if job.endswith(":left@1") and not admitting.is_set():
            admitting.set()
            await go_on.wait()  # the gate's round trip, held open
        return await real_admit(job, waiter, limits)

    def observe(tenant: str, run_id: str, stream_seq: int, commit: Any, **options: Any) -> None:
        real_observe(tenant, run_id, stream_seq, commit, **options)
        if any(e["type"] == "ApprovalGranted" for e in getattr(commit, "envelopes", [])):
            delivered.set()

    monkeypatch.setattr(dispatcher.gatekeeper, "admit", admit)
    monkeypatch.setattr(dispatcher.store, "observe", observe)
    run_id = await bare.trigger(wf, {})
    await asyncio.wait_for(admitting.wait(), 30)
    await bare.wait_for(run_id, lambda evs: any(e["type"] == "ApprovalRequested" for e in evs))
    reply = await bare.decide(run_id, "right")
    assert reply.ok, reply.error
    await asyncio.wait_for(delivered.wait(), 30)  # the approval reached the dispatcher mid-decide
    go_on.set()
    gone_through = {"StepThrottled", "StepDispatched"}
    events = await bare.wait_for(run_id, lambda evs: bool(gone_through & set(types(evs, "right"))), timeout=30)
    assert types(events, "right")[-1] == "StepThrottled", (
        f"right was dispatched beside the job holding the only slot: {types(events)}")

    opened.set()
    logs = [await bare.wait_end(run, timeout=30) for run in (blocker, run_id)]
    assert all(types(evs)[-1] == "RunSucceeded" for evs in logs), [types(evs) for evs in logs]
    assert max_in_flight(logs) == 1, "a job was dispatched beside the one holding the only slot"


# -- a concurrency limit while a dispatcher copy is SIGKILLed ----------------------------------------
class Dispatchers:
    """Dispatcher copies as real processes (``interlock serve dispatcher``); SIGKILLed at the end."""

    def __init__(self, url: str, creds: Path, limits: GateLimits, tmp: Path) -> None:
        self.env = {**os.environ, "INTERLOCK_NATS_URL": url, "INTERLOCK_CREDS": str(creds),
                    "INTERLOCK_PROVISION": "false", "INTERLOCK_SWEEP_S": "1", "PYTHONPATH": str(ROOT),
                    "INTERLOCK_GATE_LIMITS": limits.model_dump_json(exclude_defaults=True), "PYTHONUNBUFFERED": "1"}
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        with (self.tmp / f"dispatcher-{len(self.procs)}.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "interlock.cli", "serve", "dispatcher"], env=self.env,
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)


@pytest.fixture
def dispatchers(provisioned: str, principals: Principals, tmp_path: Path) -> Iterator[Any]:
    made: list[Dispatchers] = []

    def make(limits: GateLimits) -> Dispatchers:
        made.append(Dispatchers(provisioned, principals.service("dispatcher"), limits, tmp_path))
        return made[-1]

    yield make
    for d in made:
        d.stop()


async def test_a_concurrency_limit_holds_at_every_instant_while_a_dispatcher_is_killed(
        bare: Harness, dispatchers: Any, principals: Principals, tmp_path: Path) -> None:
    wf, topic, customer = unique("conc"), unique("t"), unique("cust")
    limit, runs = 2, 12
    bare.writer = await connect(bare.url, principals.service("planner"))
    for cls in service_classes():
        if cls.name != "dispatcher":
            for _ in range(2):
                service = cls(bare.service_settings(cls.name))
                await service.start()
                bare.services.append(service)
    procs = dispatchers(GateLimits())
    copies = [procs.start(), procs.start()]
    await bare.apply(f"""
id: {wf}
version: 1
concurrency: {{key: "c-{{{{ input.customer }}}}", limit: {limit}}}
steps:
  a: {{topic: {topic}, input: {{n: "{{{{ input.n }}}}"}}}}
  b: {{topic: {topic}, depends_on: [a], input: {{n: "{{{{ input.n }}}}"}}}}
""")
    for name in ("left", "right"):
        worker = Worker(name)

        @worker.job(topic)
        async def handle(ctx: JobContext) -> dict[str, Any]:
            await asyncio.sleep(0.15)
            return {"n": ctx.input.get("n")}

        await bare.start_worker(worker)
    run_ids = [await bare.trigger(wf, {"customer": customer, "n": n}) for n in range(runs)]

    async def dispatched() -> int:
        return sum([types(await bare.events(run)).count("StepDispatched") for run in run_ids])

    deadline = asyncio.get_running_loop().time() + 60
    while await dispatched() < 4:
        assert asyncio.get_running_loop().time() < deadline, f"no dispatches; see {tmp_path}"
        await asyncio.sleep(0.05)
    procs.kill(copies[0])  # mid-burst: it may hold slots, waiters, unacked messages
    procs.start()
    logs = [await bare.wait_end(run, timeout=120) for run in run_ids]
    assert all(types(evs)[-1] == "RunSucceeded" for evs in logs), [types(evs)[-3:] for evs in logs]
    peak = max_in_flight(logs)
    assert peak == limit, f"at most {limit} jobs of customer {customer} in flight at once; the log shows {peak}"
    assert any("StepThrottled" in types(evs) for evs in logs)
    dispatches = [e["data"]["job_id"] for evs in logs for e in evs if e["type"] == "StepDispatched"]
    assert len(dispatches) == len(set(dispatches)) == 2 * runs
    print(f"logs of the dispatcher copies: {tmp_path}; limits: {json.dumps(procs.env['INTERLOCK_GATE_LIMITS'])}")
