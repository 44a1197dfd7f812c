"""Work held by a killed process comes back within the ack wait, not at a lease or a deadline.

A worker holding a job and a service holding a message are SIGKILLed (real processes, see
``tests/integration/holders.py``); another copy must get the work well inside the old ack waits
(10 s for jobs, 15 s for services) and the job's own lease (60 s here): under 5 s, measured from
the kill to the event. And a live holder keeps its message however long it works on it: progress
acks stretch the short ack wait.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from interlock.contracts import headers, timing
from interlock.contracts import subjects as s
from interlock.contracts.messages import Trigger
from interlock.runtime.consumer import PullConsumer
from tests.integration.harness import Harness, connect, types, unique
from tests.principals import Principals

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 5.0  # well under the old ack waits (10 s, 15 s) and the lease below (60 s)


class Holders:
    """Holder processes of one test; every one still running is SIGKILLed at the end."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, creds: Path, *args: str, tenant: str = "default") -> subprocess.Popen[bytes]:
        env = {**os.environ, "INTERLOCK_NATS_URL": self.url, "INTERLOCK_CREDS": str(creds),
               "INTERLOCK_TENANT": tenant, "INTERLOCK_PROVISION": "false", "PYTHONPATH": str(ROOT),
               "PYTHONUNBUFFERED": "1"}
        with (self.tmp / f"holder-{len(self.procs)}.log").open("wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen([sys.executable, "-m", "tests.integration.holders", *args], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=log)
        self.procs.append(proc)
        return proc

    async def ready(self, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
        assert line.strip() == b"ready", f"holder exited before it was ready (code {proc.poll()}; logs in {self.tmp})"

    def kill(self, pid: int) -> float:
        """SIGKILL one of ours; returns the monotonic time of the kill."""
        [proc] = [p for p in self.procs if p.pid == pid]
        proc.send_signal(signal.SIGKILL)
        at = time.monotonic()
        proc.wait()
        return at

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def holders(provisioned: str, tmp_path: Path) -> Iterator[Holders]:
    h = Holders(provisioned, tmp_path)
    try:
        yield h
    finally:
        h.stop()


def _pid_in(marker: Path) -> int | None:
    text = marker.read_text() if marker.exists() else ""
    return int(text) if text else None


async def held_by(marker: Path, timeout: float = 30.0) -> int:
    """The pid of the holder that took the work, once one has."""
    deadline = time.monotonic() + timeout
    while (pid := _pid_in(marker)) is None:
        assert time.monotonic() < deadline, f"no holder took the work within {timeout}s"
        await asyncio.sleep(0.02)
    return pid


async def test_a_job_held_by_a_killed_worker_is_redelivered_within_the_ack_wait(
        harness: Harness, holders: Holders, tmp_path: Path, principals: Principals) -> None:
    wf, topic = unique("held-job"), unique("t")
    # a lease and a deadline far away: only the job's redelivery can finish this run in time
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  work: {{topic: {topic}, heartbeat_timeout_ms: 60000, timeout_ms: 120000, retries: {{max_attempts: 1}}}}
""")
    marker = tmp_path / "job-holder"
    creds = principals.worker([topic])
    two = [holders.start(creds, "worker", topic, str(marker)) for _ in range(2)]
    await asyncio.gather(*(holders.ready(proc) for proc in two))

    run_id = await harness.trigger(wf, {})
    victim = await held_by(marker)
    killed_at = holders.kill(victim)
    events = await harness.wait_for(run_id, lambda evs: "RunSucceeded" in types(evs), timeout=30)
    took = time.monotonic() - killed_at

    assert took < BOUND_S, f"the job came back {took:.1f}s after its worker was killed"
    # the same attempt, redelivered to the other copy: no timeout, no retry, one outcome
    assert "StepTimedOut" not in types(events) and types(events).count("StepSucceeded") == 1, types(events)
    assert [e["data"]["attempt"] for e in events if e["type"] == "StepDispatched"] == [1]
    output = (await harness.run_state(run_id)).steps["work"].output
    assert output["attempt"] == 1 and output["by"] != victim, output


@pytest.fixture
async def admin_nc(provisioned: str, admin_creds: Path) -> AsyncIterator[NATS]:
    nc = await connect(provisioned, admin_creds)
    try:
        yield nc
    finally:
        await nc.close()


async def publish_trigger(nc: NATS, tenant: str, workflow_id: str) -> None:
    trigger = Trigger(workflow_id=workflow_id, input={}, idempotency_key=unique("k"))
    await nc.jetstream().publish(s.trigger(tenant, workflow_id), trigger.model_dump_json().encode(),
                                 headers={headers.MSG_ID: unique("held")})


async def test_a_message_held_by_a_killed_service_goes_to_another_copy_within_the_ack_wait(
        provisioned: str, admin_nc: NATS, holders: Holders, tmp_path: Path, principals: Principals) -> None:
    # a durable of the service's own on a subject nothing else uses, so no other consumer interferes
    wf, durable = unique("held-msg"), unique("holder").replace("-", "_")
    subject = s.trigger("default", wf)
    marker = tmp_path / "service-holder"
    holder = holders.start(principals.service("planner"), "service", s.TRIGGERS_STREAM, durable, subject,
                           str(marker))
    await holders.ready(holder)
    await publish_trigger(admin_nc, "default", wf)
    victim = await held_by(marker)
    assert victim == holder.pid

    # the other copy: the same durable, in this process, with the service's credential
    nc = await connect(provisioned, principals.service("planner"))
    got: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

    async def take(msg: Msg) -> None:
        if not got.done():
            got.set_result(msg)
        await msg.ack()

    copy = PullConsumer(nc, nc.jetstream(), stream=s.TRIGGERS_STREAM, durable=durable, subject=subject, handler=take)
    await copy.start()
    try:
        killed_at = holders.kill(victim)
        msg = await asyncio.wait_for(got, 30)
        took = time.monotonic() - killed_at
        assert took < BOUND_S, f"the message came back {took:.1f}s after its holder was killed"
        assert msg.metadata.num_delivered == 2  # the held message itself, redelivered once
        assert Trigger.model_validate_json(msg.data).workflow_id == wf
    finally:
        await copy.stop()
        await nc.close()
        await admin_nc.jetstream().delete_consumer(s.TRIGGERS_STREAM, durable)


async def test_a_live_holder_keeps_its_message_past_the_ack_wait(
        provisioned: str, admin_nc: NATS, principals: Principals) -> None:
    wf, durable = unique("slow-msg"), unique("slow").replace("-", "_")
    subject = s.trigger("default", wf)
    nc = await connect(provisioned, principals.service("planner"))
    deliveries: list[int] = []
    done = asyncio.Event()

    async def slow(msg: Msg) -> None:
        deliveries.append(msg.metadata.num_delivered)
        await asyncio.sleep(3 * timing.ACK_WAIT_S)  # alive and working: progress acks keep it ours
        await msg.ack()
        done.set()

    # two copies on one durable: a redelivery would reach the idle one
    copies = [PullConsumer(nc, nc.jetstream(), stream=s.TRIGGERS_STREAM, durable=durable, subject=subject,
                           handler=slow) for _ in range(2)]
    for consumer in copies:
        await consumer.start()
    try:
        await publish_trigger(admin_nc, "default", wf)
        await asyncio.wait_for(done.wait(), 30)
        info = await nc.jetstream().consumer_info(s.TRIGGERS_STREAM, durable)
        assert deliveries == [1] and info.num_redelivered == 0, (deliveries, info)
    finally:
        for consumer in copies:
            await consumer.stop()
        await nc.close()
        await admin_nc.jetstream().delete_consumer(s.TRIGGERS_STREAM, durable)
