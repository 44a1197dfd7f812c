"""W4: loading a long run with a fresh EventStore, and rebuilding the auditor projection.

The runs are written straight to JetStream with :class:`EventStore` and :class:`Run` commands,
no services involved: every step is StepReady, PolicyDecided (allow), StepDispatched,
StepSucceeded, each appended as its own commit (as the services append them: one service, one
decision, one commit), between a RunStarted and a RunSucceeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.common import Clock, percentile, progress, summary
from interlock.auditor.projection import Projection, RebuildStats
from interlock.client import Client
from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.core.codec import job_hash
from interlock.core.eventstore import EventStore
from interlock.core.ids import job_id
from interlock.core.run import Run
from interlock.core.topology import provision

TENANT_LOAD = "bw4-load"
TENANT_CORPUS = "bw4-corpus"
WORKFLOW = "bench-replay"
EVENTS_PER_STEP = 4
CORPUS_RUN_STEPS = 12  # 2 + 12 x 4 = 50 events per corpus run
WRITE_CONCURRENCY = 64
LOAD_REPEATS = 5


def _started(key: str, tenant: str) -> ev.RunStarted:
    return ev.RunStarted(workflow_id=WORKFLOW, workflow_version="1", definition_hash="b" * 64,
                         input={"n": 0}, idempotency_key=key, tenant=tenant, requested_by="bench")


async def write_run(store: EventStore, tenant: str, steps: int, *, on_step: Any = None) -> tuple[str, int]:
    """One run of ``steps`` job steps, one event per commit; returns (run id, events)."""
    rid = uuid.uuid4()
    run_id = str(rid)
    await store.start_run(rid, _started(run_id, tenant))
    for i in range(steps):
        sid = f"s{i}"
        jh = job_hash(workflow_id=WORKFLOW, workflow_version="1", step_id=sid, topic="bench.step", input={"n": i})

        def ready(run: Run, sid: str = sid, jh: str = jh, i: int = i) -> None:
            run.mark_step_ready(ev.StepReady(step_id=sid, topic="bench.step", input={"n": i}, job_hash=jh))

        def decide(run: Run, sid: str = sid, jh: str = jh) -> None:
            run.decide_policy(ev.PolicyDecided(step_id=sid, decision="allow", snapshot_id="builtin@1",
                                               rule_ids=["builtin.allow"], job_hash=jh))

        def dispatch(run: Run, sid: str = sid) -> None:
            run.dispatch_step(ev.StepDispatched(step_id=sid, attempt=1, job_id=job_id(run_id, sid, 1),
                                                topic="bench.step",
                                                deadline=datetime.now(UTC) + timedelta(minutes=5)))

        def succeed(run: Run, sid: str = sid, i: int = i) -> None:
            run.succeed_step(ev.StepSucceeded(step_id=sid, attempt=1, output={"n": i + 1}, worker="bench"))

        for command in (ready, decide, dispatch, succeed):
            await store.update(tenant, run_id, command)
        if on_step is not None:
            on_step()
    await store.update(tenant, run_id, lambda run: run.succeed(ev.RunSucceeded(output={"n": steps})))
    return run_id, 2 + EVENTS_PER_STEP * steps


async def _raw_read_stream(js: Any, batch: int = 2000) -> int:
    """The floor of a rebuild: read every IL_EVENTS message in order, as the rebuild does, and nothing else."""
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, mem_storage=True,
                            inactive_threshold=60.0)
    sub = await js.pull_subscribe(s.EVENTS_ALL, durable=None, stream=s.EVENTS_STREAM, config=config)
    try:
        pending = int((await sub.consumer_info()).num_pending or 0)
        count = 0
        while pending > 0:
            msgs = await sub.fetch(batch, timeout=5)
            count += len(msgs)
            pending = int(msgs[-1].metadata.num_pending or 0)
        return count
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def measure(url: str, *, load_events: int, rebuild_events: int, creds: Path | None = None) -> dict[str, Any]:
    client = await Client.connect(url, tenant=TENANT_LOAD, name="bench-w4", creds=creds)
    nc, js = client.nc, client.js
    await provision(js)
    store = EventStore(nc, js, service="bench")
    out: dict[str, Any] = {}
    try:
        # -- write ---------------------------------------------------------------------------
        clock = Clock()
        steps = max(1, -(-(load_events - 2) // EVENTS_PER_STEP))  # at least load_events events
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if done % 500 == 0:
                progress(f"W4: writing the long run, {done * EVENTS_PER_STEP} events ({clock.elapsed():.1f} s)")

        load_run, load_count = await write_run(store, TENANT_LOAD, steps, on_step=tick)
        remaining = max(0, rebuild_events - load_count)
        per_run = 2 + EVENTS_PER_STEP * CORPUS_RUN_STEPS
        corpus_runs = (remaining + per_run - 1) // per_run
        written = load_count
        slots = asyncio.Semaphore(WRITE_CONCURRENCY)
        next_report = 10_000

        async def one() -> None:
            nonlocal written, next_report
            async with slots:
                _, n = await write_run(store, TENANT_CORPUS, CORPUS_RUN_STEPS)
            written += n
            if written >= next_report:
                next_report += 10_000
                progress(f"W4: written {written} events ({written / clock.elapsed():.0f}/s)")

        await asyncio.gather(*(one() for _ in range(corpus_runs)))
        out["write"] = {"events": written, "seconds": round(clock.elapsed(), 2),
                        "events_per_s": round(written / clock.elapsed(), 1), "commit_shape": "one event per commit",
                        "corpus_runs": corpus_runs, "corpus_run_events": per_run}
        progress(f"W4: wrote {written} events in {clock.elapsed():.1f} s")

        # -- load the long run with a fresh store, several times ------------------------------
        loads: list[float] = []
        for _ in range(LOAD_REPEATS):
            fresh = EventStore(nc, js, service="bench-load")
            t0 = time.perf_counter()
            handle = await fresh.load(TENANT_LOAD, load_run, fresh=True)
            loads.append((time.perf_counter() - t0) * 1000)
            assert handle.version == load_count, (handle.version, load_count)
        # the floor: the same batched direct gets a load makes, without the replay
        raw: list[float] = []
        commits = 0
        for _ in range(LOAD_REPEATS):
            t0 = time.perf_counter()
            commits = len(await client.read_commits(load_run))
            raw.append((time.perf_counter() - t0) * 1000)
        out["load"] = {"events": load_count, "commits": commits, "repeats": LOAD_REPEATS,
                       "ms": summary(loads), "p50_ms": round(percentile(loads, 50) or 0, 2),
                       "floor_ms": summary(raw), "floor_p50_ms": round(percentile(raw, 50) or 0, 2)}
        progress(f"W4: load of {load_count} events p50 {out['load']['p50_ms']:.1f} ms "
                 f"(raw read {out['load']['floor_p50_ms']:.1f} ms)")

        # -- rebuild the projection from the whole stream -------------------------------------
        with tempfile.TemporaryDirectory(prefix="interlock-bench-proj-") as tmp:
            projection = Projection(Path(tmp) / "auditor.sqlite3")

            def report(stats: RebuildStats) -> None:
                progress(f"W4: rebuild at {stats.events} events")

            try:
                t0 = time.perf_counter()
                stats = await projection.rebuild(store, progress=report)
                rebuild_s = time.perf_counter() - t0
            finally:
                await projection.close()
        t0 = time.perf_counter()
        raw_count = await _raw_read_stream(js)
        raw_s = time.perf_counter() - t0
        out["rebuild"] = {"events": stats.events, "commits": stats.commits, "runs": stats.runs,
                          "broken_runs": stats.broken_runs, "seconds": round(rebuild_s, 3),
                          "events_per_s": round(stats.events / rebuild_s, 1) if rebuild_s else None,
                          "projection": "SQLite file (WAL), as the auditor uses",
                          "floor_messages": raw_count, "floor_seconds": round(raw_s, 3)}
        progress(f"W4: rebuild of {stats.events} events in {rebuild_s:.2f} s (raw read {raw_s:.2f} s)")
    finally:
        await client.close()
    return out
