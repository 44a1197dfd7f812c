"""The floor: the hops Interlock does per step, done with raw nats-py JetStream and nothing else.

Four roles stand in for the services and the worker. Each role is its own OS process (as the
services are) with its own NATS connection and durable pull consumer(s) on one scratch stream
(``BENCH_FLOOR``, file storage, like the Interlock streams). A role fetches in batches
(``fetch(256)``, which returns as soon as anything is there) and handles each message in its own
task: publish the next message and await its ack, then ack the consumed message. Per step that
is the chain

    planner --ready--> policy --decided--> dispatcher --job--> worker --result--> dispatcher
            --succeeded--> planner

i.e. 6 acked publishes (ready, decided, dispatched, job, result, succeeded; "dispatched" stands
for the StepDispatched append nobody waits for) and 5 pull-consume + ack hops. A run adds one
trigger publish consumed by the planner and one "done" publish that the client (the bench
process) receives on a core subscription, as the bench receives a run's terminal event. The
planner keeps each run's DAG in memory and publishes ``ready`` for every step whose
dependencies have all succeeded.

Scheduling overhead is measured the same way as for Interlock: each ``ready`` carries the time
its last dependency's ``succeeded`` was published (or, for a first step, the time the planner
started the run); the worker subtracts it from the time it got the job and the value travels
back to the client in the run's ``done`` message.

No hash chain, no expected-sequence or message-id headers, no validation, no aggregate, no
policy engine, no auditor: this is the cost of the messaging alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from bench.common import FIVE_STEP_DEPS, Clock, percentile, progress, summary
from interlock.runtime.connect import creds_options

CREDS_ENV = "BENCH_FLOOR_CREDS"

ROOT = Path(__file__).resolve().parents[1]  # the checkout: role processes import bench from it
STREAM = "BENCH_FLOOR"
FETCH_BATCH = 256
MAX_INFLIGHT = 512  # handler tasks per consumer
PAD = "x" * 400  # payloads of roughly the size of a small Interlock event (~0.5 kB)

HOPS_PER_STEP = 5
PUBLISHES_PER_STEP = 6

# role -> the subjects it consumes (one durable pull consumer each)
ROLES: dict[str, tuple[str, ...]] = {
    "planner": ("floor.trigger", "floor.succeeded.>"),
    "policy": ("floor.ready.>",),
    "dispatcher": ("floor.decided.>", "floor.result.>"),
    "worker": ("floor.job",),
}


def durable_name(role: str, subject: str) -> str:
    return f"{role}_{subject.replace('.', '_').replace('>', 'all')}"


def fan_out(items: int) -> dict[str, list[str]]:
    return {f"fan{i}": [] for i in range(items)}


def _body(run: str, step: str, **extra: Any) -> bytes:
    return json.dumps({"run": run, "step": step, "t": time.time(), "pad": PAD, **extra}).encode()


# -- a role process -----------------------------------------------------------------------------
@dataclass
class _RunState:
    deps: dict[str, list[str]]
    started: float = 0.0
    readied: set[str] = field(default_factory=set)
    succeeded_at: dict[str, float] = field(default_factory=dict)
    overheads: list[float] = field(default_factory=list)


class Role:
    def __init__(self, role: str, url: str) -> None:
        self.role = role
        self.url = url
        self.runs: dict[str, _RunState] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        nc = await nats.connect(self.url, name=f"bench-floor-{self.role}",
                                **creds_options(os.environ.get(CREDS_ENV)))
        handlers: dict[str, Callable[[NATS, Msg], Awaitable[None]]] = {
            "floor.trigger": self._on_trigger, "floor.succeeded.>": self._on_succeeded,
            "floor.ready.>": self._on_ready, "floor.decided.>": self._on_decided,
            "floor.result.>": self._on_result, "floor.job": self._on_job,
        }
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loops = [asyncio.create_task(self._consume(nc, subject, handlers[subject])) for subject in ROLES[self.role]]
        await nc.publish(f"bench.floorup.{self.role}", b"")
        await stop.wait()
        for task in loops:
            task.cancel()
        with contextlib.suppress(Exception):
            await nc.close()

    async def _consume(self, nc: NATS, subject: str, handler: Callable[[NATS, Msg], Awaitable[None]]) -> None:
        sub = await nc.jetstream().pull_subscribe_bind(durable_name(self.role, subject), stream=STREAM)
        slots = asyncio.Semaphore(MAX_INFLIGHT)

        async def handle(msg: Msg) -> None:
            try:
                await handler(nc, msg)
            except Exception as e:
                if not nc.is_closed:
                    print(f"bench floor {self.role}: {subject}: {e!r}", file=sys.stderr, flush=True)
            finally:
                slots.release()

        while not nc.is_closed:
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                return
            for msg in msgs:
                await slots.acquire()
                task = asyncio.create_task(handle(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    # planner
    async def _publish_ready(self, nc: NATS, run: str, steps: list[str], since: dict[str, float]) -> None:
        js = nc.jetstream()
        await asyncio.gather(*(js.publish(f"floor.ready.{run}", _body(run, step, since=since[step]))
                               for step in steps))

    async def _on_trigger(self, nc: NATS, msg: Msg) -> None:
        body = json.loads(msg.data)
        run = body["run"]
        state = self.runs[run] = _RunState(deps=body["deps"], started=time.time())
        roots = [step for step, deps in state.deps.items() if not deps]
        state.readied.update(roots)
        await self._publish_ready(nc, run, roots, dict.fromkeys(roots, state.started))
        await msg.ack()

    async def _on_succeeded(self, nc: NATS, msg: Msg) -> None:
        body = json.loads(msg.data)
        run, step = body["run"], body["step"]
        state = self.runs[run]
        state.succeeded_at[step] = body["t"]
        state.overheads.append(body["overhead"])
        ready = [s for s, deps in state.deps.items()
                 if s not in state.readied and all(d in state.succeeded_at for d in deps)]
        state.readied.update(ready)
        if ready:
            since = {s: max((state.succeeded_at[d] for d in state.deps[s]), default=state.started) for s in ready}
            await self._publish_ready(nc, run, ready, since)
        elif len(state.succeeded_at) == len(state.deps):
            await nc.jetstream().publish(f"floor.done.{run}", _body(run, "", overheads=state.overheads))
            del self.runs[run]
        await msg.ack()

    # policy
    async def _on_ready(self, nc: NATS, msg: Msg) -> None:
        body = json.loads(msg.data)
        await nc.jetstream().publish(f"floor.decided.{body['run']}", _body(body["run"], body["step"],
                                                                           since=body["since"]))
        await msg.ack()

    # dispatcher
    async def _on_decided(self, nc: NATS, msg: Msg) -> None:
        body = json.loads(msg.data)
        js = nc.jetstream()
        await js.publish(f"floor.dispatched.{body['run']}", _body(body["run"], body["step"]))
        await js.publish("floor.job", _body(body["run"], body["step"], since=body["since"]))
        await msg.ack()

    async def _on_result(self, nc: NATS, msg: Msg) -> None:
        body = json.loads(msg.data)
        await nc.jetstream().publish(f"floor.succeeded.{body['run']}", _body(body["run"], body["step"],
                                                                             overhead=body["overhead"]))
        await msg.ack()

    # worker
    async def _on_job(self, nc: NATS, msg: Msg) -> None:
        received = time.time()
        body = json.loads(msg.data)
        await msg.ack()
        await nc.jetstream().publish(f"floor.result.{body['run']}", _body(body["run"], body["step"],
                                                                          overhead=received - body["since"]))


def _role_main(role: str, url: str) -> None:
    asyncio.run(Role(role, url).run())


# -- the client (the bench process) -------------------------------------------------------------
class Floor:
    """The floor emulation on a NATS server at ``url``: role processes plus this client."""

    def __init__(self, url: str, creds: Path | None = None) -> None:
        self.url = url
        self.creds = creds
        self.nc: NATS | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.done: dict[str, asyncio.Future[tuple[float, list[float]]]] = {}

    async def start(self) -> None:
        self.nc = nc = await nats.connect(self.url, name="bench-floor-client", **creds_options(self.creds))
        js = nc.jetstream()
        with contextlib.suppress(Exception):
            await js.delete_stream(STREAM)
        await js.add_stream(StreamConfig(name=STREAM, subjects=["floor.>"], storage=StorageType.FILE,
                                         allow_direct=True))
        for role, subjects in ROLES.items():
            for subject in subjects:
                await js.add_consumer(STREAM, ConsumerConfig(
                    durable_name=durable_name(role, subject), filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
                    max_ack_pending=20_000, deliver_policy=DeliverPolicy.ALL, ack_wait=60))
        await nc.subscribe("floor.done.*", cb=self._on_done)
        up = await nc.subscribe("bench.floorup.*")
        self._spawn_roles()
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while len(seen) < len(ROLES):
            dead = [role for role, p in zip(ROLES, self.procs, strict=True) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"floor role processes did not start: {dead or 'timeout'}")
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                msg = await up.next_msg(timeout=0.5)
                seen.add(msg.subject)
        await up.unsubscribe()

    def _spawn_roles(self) -> None:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, **({CREDS_ENV: str(self.creds)} if self.creds else {})}
        for role in ROLES:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "bench.floor", role, self.url], cwd=ROOT,
                                               env=env, stdin=subprocess.DEVNULL))

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.jetstream().delete_stream(STREAM)
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def _on_done(self, msg: Msg) -> None:
        now = time.perf_counter()
        run = msg.subject.rsplit(".", 1)[-1]
        future = self.done.get(run)
        if future is not None and not future.done():
            future.set_result((now, json.loads(msg.data)["overheads"]))

    def new_run(self) -> str:
        run = uuid.uuid4().hex
        self.done[run] = asyncio.get_running_loop().create_future()
        return run

    async def trigger(self, run: str, deps: dict[str, list[str]]) -> None:
        assert self.nc is not None
        await self.nc.jetstream().publish("floor.trigger", json.dumps({"run": run, "deps": deps}).encode())

    async def one_run(self, deps: dict[str, list[str]], timeout: float = 60.0) -> tuple[float, list[float]]:
        """Submit one run and wait for its end: (seconds from submit to "done", step overheads)."""
        run = self.new_run()
        t0 = time.perf_counter()
        await self.trigger(run, deps)
        try:
            end, overheads = await asyncio.wait_for(self.done[run], timeout)
        finally:
            self.done.pop(run, None)
        return end - t0, overheads


async def measure(url: str, *, w1: tuple[int, int] | None, w2_runs: int | None, w3_items: int | None,
                  creds: Path | None = None) -> dict[str, Any]:
    """The floor of W1 (warm-up, runs), W2 (concurrent runs) and W3 (fan-out items); ``creds``:
    the credential every floor process connects with (the server has auth on, like the stack's)."""
    floor = Floor(url, creds)
    await floor.start()
    results: dict[str, Any] = {"processes": len(ROLES), "roles": {r: list(s) for r, s in ROLES.items()}}
    try:
        # one untimed run: the role processes' first fetches and connections warm up
        await floor.one_run(FIVE_STEP_DEPS, timeout=60)
        if w1 is not None:
            warmup, count = w1
            for _ in range(warmup):
                await floor.one_run(FIVE_STEP_DEPS)
            samples: list[float] = []
            over: list[float] = []
            for _ in range(count):
                secs, overheads = await floor.one_run(FIVE_STEP_DEPS)
                samples.append(secs * 1000)
                over.extend(x * 1000 for x in overheads)
            results["W1"] = {"runs": count, "warmup": warmup, "latency_ms": summary(samples),
                             "p50_ms": round(percentile(samples, 50) or 0, 3),
                             "p99_ms": round(percentile(samples, 99) or 0, 3),
                             "overhead_ms": summary(over), "overhead_p50_ms": round(percentile(over, 50) or 0, 3),
                             "hops_per_run": 1 + HOPS_PER_STEP * len(FIVE_STEP_DEPS),
                             "critical_path_hops": 1 + HOPS_PER_STEP * 4,
                             "publishes_per_run": 2 + PUBLISHES_PER_STEP * len(FIVE_STEP_DEPS)}
            progress(f"floor W1: p50 {results['W1']['p50_ms']:.2f} ms over {count} runs")
        if w2_runs:
            runs = [floor.new_run() for _ in range(w2_runs)]
            clock = Clock()
            await asyncio.gather(*(floor.trigger(run, FIVE_STEP_DEPS) for run in runs))
            ends = await asyncio.wait_for(asyncio.gather(*(floor.done[run] for run in runs)), 600)
            seconds = clock.elapsed()
            steps = w2_runs * len(FIVE_STEP_DEPS)
            over = [x * 1000 for _, overheads in ends for x in overheads]
            results["W2"] = {"runs": w2_runs, "steps": steps, "seconds": round(seconds, 3),
                             "runs_per_s": round(w2_runs / seconds, 1), "steps_per_s": round(steps / seconds, 1),
                             "overhead_ms": summary(over),
                             "overhead_p50_ms": round(percentile(over, 50) or 0, 3),
                             "overhead_p99_ms": round(percentile(over, 99) or 0, 3)}
            progress(f"floor W2: {results['W2']['steps_per_s']:.0f} steps/s over {w2_runs} concurrent runs")
        if w3_items:
            seconds, _ = await floor.one_run(fan_out(w3_items), timeout=300)
            results["W3"] = {"items": w3_items, "seconds": round(seconds, 3), "hops": 1 + HOPS_PER_STEP * w3_items}
            progress(f"floor W3: {w3_items} parallel items in {seconds:.3f} s")
    finally:
        await floor.stop()
    return results


def main() -> None:  # a role by hand, for debugging: python -m bench.floor ROLE URL
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=list(ROLES))
    parser.add_argument("url")
    args = parser.parse_args()
    _role_main(args.role, args.url)


if __name__ == "__main__":
    main()
