"""The one-hop floor: one acknowledged publish and one consume + ack per step, and nothing else.

Issue #15 asks for this next to the same-hops floor (:mod:`bench.floor`): the least a durable
orchestrator on JetStream can do per step. One process, one connection, one scratch stream
(``BENCH_ONEHOP``, file storage like the Interlock streams) and one durable pull consumer: a
run's steps whose dependencies have all completed are published (each publish awaits its
JetStream ack); the consumer fetches them in batches, acks each and marks its step done, which
publishes the steps that became ready. A run ends when its last step is consumed. No worker, no
policy, no separate services: the chain per step is a single stored message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from bench.common import FIVE_STEP_DEPS, Clock, percentile, progress, summary
from bench.floor import PAD, fan_out
from interlock.runtime.connect import creds_options

STREAM = "BENCH_ONEHOP"
SUBJECT = "onehop.step"
DURABLE = "onehop"
FETCH_BATCH = 256


@dataclass
class _Run:
    deps: dict[str, list[str]]
    done: asyncio.Future[float]
    completed: set[str] = field(default_factory=set)
    published: set[str] = field(default_factory=set)


class OneHop:
    """The one-hop loop on the NATS server at ``url``."""

    def __init__(self, url: str, creds: Path | None = None) -> None:
        self.url = url
        self.creds = creds
        self.nc: NATS | None = None
        self.runs: dict[str, _Run] = {}
        self._consumer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.nc = nc = await nats.connect(self.url, name="bench-onehop", **creds_options(self.creds))
        js = nc.jetstream()
        with contextlib.suppress(Exception):
            await js.delete_stream(STREAM)
        await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{SUBJECT}.>"], storage=StorageType.FILE))
        await js.add_consumer(STREAM, ConsumerConfig(
            durable_name=DURABLE, filter_subject=f"{SUBJECT}.>", ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=20_000, deliver_policy=DeliverPolicy.ALL, ack_wait=60))
        self._consumer = asyncio.create_task(self._consume())

    async def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._consumer
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.jetstream().delete_stream(STREAM)
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def publish_ready(self, run_id: str) -> None:
        """Publish the run's steps whose dependencies have all completed (once each)."""
        assert self.nc is not None
        run = self.runs[run_id]
        ready = [step for step, deps in run.deps.items()
                 if step not in run.published and all(d in run.completed for d in deps)]
        run.published.update(ready)
        js = self.nc.jetstream()
        body = {"run": run_id, "pad": PAD}
        await asyncio.gather(*(js.publish(f"{SUBJECT}.{run_id}", json.dumps({**body, "step": step}).encode())
                               for step in ready))

    async def _consume(self) -> None:
        assert self.nc is not None
        sub = await self.nc.jetstream().pull_subscribe_bind(DURABLE, stream=STREAM)
        while True:
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                task = asyncio.create_task(self._on_step(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _on_step(self, msg: Msg) -> None:
        body = json.loads(msg.data)
        await msg.ack()
        run = self.runs.get(body["run"])
        if run is None:
            return
        run.completed.add(body["step"])
        if len(run.completed) == len(run.deps):
            del self.runs[body["run"]]
            run.done.set_result(time.perf_counter())
        else:
            await self.publish_ready(body["run"])

    async def one_run(self, deps: dict[str, list[str]], timeout: float = 60.0) -> float:
        """One run from its first publish to its last step consumed (seconds)."""
        run_id = self.new_run(deps)
        done = self.runs_done(run_id)
        t0 = time.perf_counter()
        await self.publish_ready(run_id)
        return await asyncio.wait_for(done, timeout) - t0

    def new_run(self, deps: dict[str, list[str]]) -> str:
        run_id = uuid.uuid4().hex
        self.runs[run_id] = _Run(deps=deps, done=asyncio.get_running_loop().create_future())
        return run_id

    def runs_done(self, run_id: str) -> asyncio.Future[float]:
        return self.runs[run_id].done


async def measure(url: str, *, w1: tuple[int, int] | None, w2_runs: int | None, w3_items: int | None,
                  creds: Path | None = None) -> dict[str, Any]:
    """The one-hop floor of W1 (warm-up, runs), W2 (concurrent runs) and W3 (fan-out items)."""
    hop = OneHop(url, creds)
    await hop.start()
    results: dict[str, Any] = {"processes": 1, "hops_per_step": 1}
    try:
        await hop.one_run(FIVE_STEP_DEPS)  # untimed: the consumer's first fetch warms up
        if w1 is not None:
            warmup, count = w1
            for _ in range(warmup):
                await hop.one_run(FIVE_STEP_DEPS)
            samples = [await hop.one_run(FIVE_STEP_DEPS) * 1000 for _ in range(count)]
            results["W1"] = {"runs": count, "warmup": warmup, "latency_ms": summary(samples),
                             "p50_ms": round(percentile(samples, 50) or 0, 3),
                             "p99_ms": round(percentile(samples, 99) or 0, 3)}
            progress(f"one-hop floor W1: p50 {results['W1']['p50_ms']:.2f} ms over {count} runs")
        if w2_runs:
            runs = [hop.new_run(FIVE_STEP_DEPS) for _ in range(w2_runs)]
            done = [hop.runs_done(run) for run in runs]
            clock = Clock()
            await asyncio.gather(*(hop.publish_ready(run) for run in runs))
            await asyncio.wait_for(asyncio.gather(*done), 600)
            seconds = clock.elapsed()
            steps = w2_runs * len(FIVE_STEP_DEPS)
            results["W2"] = {"runs": w2_runs, "steps": steps, "seconds": round(seconds, 3),
                             "runs_per_s": round(w2_runs / seconds, 1), "steps_per_s": round(steps / seconds, 1)}
            progress(f"one-hop floor W2: {results['W2']['steps_per_s']:.0f} steps/s over {w2_runs} concurrent runs")
        if w3_items:
            seconds = await hop.one_run(fan_out(w3_items), timeout=300)
            results["W3"] = {"items": w3_items, "seconds": round(seconds, 3)}
            progress(f"one-hop floor W3: {w3_items} parallel items in {seconds:.3f} s")
    finally:
        await hop.stop()
    return results
