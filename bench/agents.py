"""Trivial agents for the benchmark, run by the stack as their own worker process.

Every job is answered at once with ``{"n": input.n + 1}``. For each job the agent publishes one
core NATS message on ``bench.recv`` (not JetStream: nothing is persisted, nothing waits for an
ack) with two wall-clock times the bench compares with the run's event times (same machine, same
clock):

- ``recv``: the moment the worker SDK got the job message from its pull consumer, before it acks
  the job and sends its "started" heartbeat (read in :meth:`TimedWorker._handle`);
- ``start``: the moment the handler was called.

This file is loaded by path (``interlock worker bench/agents.py:worker``), so it imports nothing
from the ``bench`` package.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextvars import ContextVar
from typing import Any

from interlock.worker import JobContext, Worker

TOPIC = "bench.step"
SLOW_TOPIC = "bench.slow"  # the PRIO workload: an agent that takes BENCH_SLOW_MS per job (a saturated topic)
RECV_SUBJECT = "bench.recv"

# set by _handle in the task that handles one job message; the handler task inherits it
_received: ContextVar[float] = ContextVar("bench_received", default=0.0)


class TimedWorker(Worker):
    """A Worker that notes when each job message arrived."""

    async def _handle(self, js: Any, msg: Any, *, registration: Any) -> None:
        _received.set(time.time())
        await super()._handle(js, msg, registration=registration)


# trivial agents do no I/O of their own, so more of them at once only costs a task each
worker = TimedWorker("bench", concurrency=int(os.environ.get("BENCH_WORKER_CONCURRENCY", "64")))


@worker.job(TOPIC)
async def step(ctx: JobContext) -> dict[str, int]:
    start = time.time()
    nc = worker._nc
    if nc is not None:
        record = {"job_id": ctx.job_id, "recv": _received.get() or start, "start": start}
        await nc.publish(RECV_SUBJECT, json.dumps(record).encode())
    value = ctx.input.get("n", 0) if isinstance(ctx.input, dict) else 0
    return {"n": int(value or 0) + 1}


@worker.job(SLOW_TOPIC)
async def slow(ctx: JobContext) -> dict[str, int]:
    await asyncio.sleep(int(os.environ.get("BENCH_SLOW_MS", "20")) / 1000)
    return {"n": 1}
