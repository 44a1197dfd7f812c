"""W1, W2, W3 and W5 on the whole stack: embedded nats-server, the five services and the bench
worker, each its own OS process, every event persisted in JetStream (file storage) as in
production.

The bench process only submits triggers (:meth:`interlock.client.Client.start_run`) and listens:

- to each run's event subject (``subjects.run_events``) with a core NATS subscription made
  before the trigger is published, stopping the clock at the terminal event (no polling);
- to ``bench.recv``, where the bench agents report when each job reached the worker.

After a workload it reads the runs' logs back from the stream to compute per-step figures from
the events' own ``at`` times (same machine, same clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bench.common import (
    FIVE_STEP_DEPS,
    TERMINAL_MARKERS,
    Clock,
    parse_at,
    percentile,
    progress,
    summary,
)
from interlock.client import TERMINAL_EVENTS, Client
from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.core.ids import run_id_for
from interlock.devstack.stack import Stack
from interlock.devstack.targets import worker_topics
from interlock.identity import Permissions, permissions_for

HERE = Path(__file__).resolve().parent
AGENTS = HERE / "agents.py"
TOPIC = "bench.step"
RECV_SUBJECT = "bench.recv"
WF_FIVE = "bench-five"
WF_FAN = "bench-fan"
FIVE_STEP_YAML = f"""
id: {WF_FIVE}
version: 1
steps:
  a: {{topic: {TOPIC}, input: {{n: "{{{{ input.n }}}}"}}}}
  b: {{topic: {TOPIC}, depends_on: [a], input: {{n: "{{{{ steps.a.output.n }}}}"}}}}
  c: {{topic: {TOPIC}, depends_on: [a], input: {{n: "{{{{ steps.a.output.n }}}}"}}}}
  d: {{topic: {TOPIC}, depends_on: [b, c], input: {{n: "{{{{ steps.b.output.n + steps.c.output.n }}}}"}}}}
  e: {{topic: {TOPIC}, depends_on: [d], input: {{n: "{{{{ steps.d.output.n }}}}"}}}}
"""
FAN_YAML = f"""
id: {WF_FAN}
version: 1
steps:
  fan:
    topic: {TOPIC}
    # not `input.items`: Jinja resolves that to the dict's .items method (see README)
    for_each: "{{{{ input['items'] }}}}"
    input: {{n: "{{{{ item }}}}"}}
"""
T1, T2, T3 = "bw1", "bw2", "bw3"
TP = "bwp"  # the PRIO workload's tenant

# stages of one step, named by who does the work between two instants (see README)
STAGES = (
    ("plan", "last dependency's StepSucceeded (or RunStarted) -> StepReady: planner consumes and plans"),
    ("policy", "StepReady -> PolicyDecided: the planner's decision request to the policy service (one commit); "
               "unanswered: planner append, delivery, policy decides"),
    ("dispatch", "PolicyDecided -> StepDispatched: the commit's append (planner's, or policy's), delivery, "
                 "dispatcher decides"),
    ("to_worker", "StepDispatched -> job at the worker: dispatcher append + job publish, worker pull"),
    ("sdk", "job at the worker -> handler called: SDK acks the job, sends the 'started' heartbeat"),
    ("outcome", "handler called -> StepSucceeded: result publish, delivery, dispatcher decides"),
)


# -- memory (W5) -----------------------------------------------------------------------------
def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Sum of VmRSS over the stack's processes, every ``interval`` seconds, in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, int, dict[str, int]]] = []  # (perf time, total kB, per process)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            per = {name: rss_kb(pid) for name, pid in self.pids.items()}
            self.samples.append((time.perf_counter(), sum(per.values()), per))
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> list[tuple[float, int, dict[str, int]]]:
        return [x for x in self.samples if start <= x[0] <= end]


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (/proc/<pid>/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in {**pids, "bench": os.getpid()}.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            out[name] = 0.0
    return out


def cpu_report(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, Any]:
    used = {name: round(after.get(name, 0.0) - before.get(name, 0.0), 2) for name in after}
    total = sum(used.values())
    return {"seconds": used, "total_seconds": round(total, 2),
            "share_of_machine_pct": round(100 * total / (wall * (os.cpu_count() or 1)), 1) if wall else None}


def _mb(kb: float) -> float:
    return round(kb / 1024, 1)


# -- the stack -------------------------------------------------------------------------------
@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    """Stack.start/stop write and remove ``.interlock/nats.url`` relative to the working directory:
    keep that file in the bench's own home, never in the user's checkout."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class StackBench:
    def __init__(self, home: Path, telemetry_endpoint: str | None = None, gate_limits: str | None = None,
                 prio: bool = False) -> None:
        """``telemetry_endpoint``: every process exports traces and metrics there over OTLP/HTTP,
        serves /metrics and logs JSON (to measure what telemetry costs); ``gate_limits``: the
        dispatcher's workload limits (``INTERLOCK_GATE_LIMITS``, JSON); ``prio``: a worker for the
        PRIO workload's tenant too."""
        self.home = home
        env = {"INTERLOCK_AUDITOR_DB": str(home / "auditor.sqlite3"), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        if gate_limits:
            env["INTERLOCK_GATE_LIMITS"] = gate_limits
        if telemetry_endpoint:
            env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": telemetry_endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                    "INTERLOCK_LOG_FORMAT": "json"}
        # a worker serves one tenant: one bench worker process per tenant the workloads use
        tenants = (T1, T2, T3, TP) if prio else (T1, T2, T3)
        self.stack = Stack(home=home, port=0, workers=[f"{AGENTS}:worker"], worker_tenants=tenants, env=env,
                           metrics=telemetry_endpoint is not None)
        self.client: Client | None = None
        self.recv: dict[str, tuple[float, float]] = {}  # job id -> (at the worker, handler called)
        self.nonce = uuid.uuid4().hex[:8]
        self.failures: list[dict[str, Any]] = []

    def _instrumented_creds(self) -> Path:
        """Auth is on as in production: services connect with their service credentials and the
        bench workers with worker credentials of their tenant and topics, plus the one subject the
        bench's receipt times travel on; the bench itself (a client of three tenants and a listener
        on that subject, no Interlock principal) with a credential that may do anything."""
        identity = self.stack.identity
        for name, target, tenant in self.stack.worker_specs():
            topics = worker_topics(target)

            def grant(key: str, tenant: str = tenant, name: str = name, topics: tuple[str, ...] = topics
                      ) -> Permissions:
                base = permissions_for("worker", tenant, name, key, topics)
                return dataclasses.replace(base, pub_allow=(*base.pub_allow, RECV_SUBJECT))

            self.stack.creds[name] = identity.issue_custom(f"bench-{name}-{self.nonce}", grant)
        return identity.issue_custom(f"bench-client-{self.nonce}", Permissions())

    async def start(self) -> None:
        with _cwd(self.home):
            creds = self._instrumented_creds()
            self.stack.start_nats()
            await self.stack.provision()
            self.stack.start()
        self.client = client = await Client.connect(self.stack.url, name="bench", creds=creds)
        await client.nc.subscribe(RECV_SUBJECT, cb=self._on_recv)
        await client.apply_workflow(FIVE_STEP_YAML)
        await client.apply_workflow(FAN_YAML)

    @property
    def nc(self) -> NATS:
        assert self.client is not None, "the bench is not started"
        return self.client.nc

    def tenant(self, tenant: str) -> Client:
        """The bench's client acting for ``tenant`` (one connection for all)."""
        assert self.client is not None, "the bench is not started"
        return self.client.with_tenant(tenant)

    def stop(self) -> None:
        with _cwd(self.home):
            self.stack.stop()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    def pids(self) -> dict[str, int]:
        pids = {}
        if self.stack.nats is not None and self.stack.nats._proc is not None:
            pids["nats-server"] = self.stack.nats._proc.pid
        for name, proc in self.stack.procs.items():
            if proc.popen is not None:
                pids[name] = proc.popen.pid
        return pids

    def check_alive(self) -> None:
        dead = self.stack.dead()
        if dead:
            tails = []
            for name in dead:
                path = self.stack.procs[name].log_path
                with contextlib.suppress(OSError):
                    tails.append(f"--- {name} ({path}) ---\n" + "\n".join(path.read_text().splitlines()[-20:]))
            raise RuntimeError(f"stack processes died: {', '.join(dead)}\n" + "\n".join(tails))

    async def _on_recv(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError, KeyError):
            record = json.loads(msg.data)
            self.recv[record["job_id"]] = (float(record["recv"]), float(record["start"]))

    async def events(self, tenant: str, run_id: str) -> tuple[list[dict[str, Any]], int]:
        """A run's events from the stream and its number of commits."""
        commits = await self.tenant(tenant).read_commits(run_id)
        return [e for c in commits for e in c.envelopes], len(commits)

    # -- W1 --------------------------------------------------------------------------------
    async def one_run(self, workflow: str, run_input: Any, tenant: str, key: str, timeout: float,
                      priority: int | None = None) -> tuple[str, float, float, str]:
        """Trigger one run; (run id, submit wall time, seconds to its terminal event, terminal type).

        A run that does not succeed is reported in ``self.failures`` with its terminal event's data.
        """
        client = self.tenant(tenant)
        run_id = str(run_id_for(tenant, workflow, key))
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[tuple[float, str]] = loop.create_future()

        async def on_commit(msg: Msg) -> None:
            now = time.perf_counter()
            if ended.done() or not any(m in msg.data for m in TERMINAL_MARKERS):
                return
            for envelope in json.loads(msg.data)["events"]:
                if envelope["type"] in TERMINAL_EVENTS:
                    ended.set_result((now, envelope["type"]))
                    if envelope["type"] != ev.RunSucceeded.type_name:
                        self.failures.append({"run_id": run_id, "workflow": workflow, "type": envelope["type"],
                                              "data": envelope.get("data")})
                    return

        sub = await self.nc.subscribe(s.run_log(tenant, run_id), cb=on_commit)
        try:
            wall = time.time()
            t0 = time.perf_counter()
            # check=False: no registry read inside the measured interval (the workflows are applied)
            await client.start_run(workflow, run_input, key=key, check=False, priority=priority)
            try:
                end, kind = await asyncio.wait_for(ended, timeout)
            except TimeoutError:
                self.check_alive()
                raise RuntimeError(f"run {run_id} of {workflow} did not end within {timeout}s") from None
            return run_id, wall, end - t0, kind
        finally:
            await sub.unsubscribe()

    async def w1(self, warmup: int, count: int) -> dict[str, Any]:
        for i in range(warmup):
            # the first run waits for the services and the worker to be up
            _, _, secs, kind = await self.one_run(WF_FIVE, {"n": 1}, T1, f"w1-warm-{self.nonce}-{i}",
                                                  timeout=120 if i == 0 else 30)
            if kind != ev.RunSucceeded.type_name:
                raise RuntimeError(f"warm-up run ended {kind}: {self.failures[-1:]}")
        progress(f"W1: warmed up with {warmup} runs")
        if count == 0:
            return {}
        runs: list[tuple[str, float]] = []
        samples: list[float] = []
        failed = 0
        for i in range(count):
            run_id, wall, secs, kind = await self.one_run(WF_FIVE, {"n": 1}, T1, f"w1-{self.nonce}-{i}", timeout=30)
            samples.append(secs * 1000)
            runs.append((run_id, wall))
            failed += kind != ev.RunSucceeded.type_name
        await asyncio.sleep(0.2)  # the last bench.recv records
        logs = [(await self.events(T1, run_id), wall) for run_id, wall in runs]
        analysis = analyse(logs, self.recv, FIVE_STEP_DEPS)
        result = {
            "runs": count, "warmup": warmup, "failed_runs": failed, "latency_ms": summary(samples),
            "p50_ms": round(percentile(samples, 50) or 0, 3), "p99_ms": round(percentile(samples, 99) or 0, 3),
            "samples_ms": [round(x, 3) for x in samples], **analysis,
        }
        progress(f"W1: p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms over {count} runs")
        return result

    # -- W2 --------------------------------------------------------------------------------
    async def w2(self, count: int) -> dict[str, Any]:
        client = self.tenant(T2)
        pids = self.pids()
        keys = [f"w2-{self.nonce}-{i}" for i in range(count)]
        run_ids = {str(run_id_for(T2, WF_FIVE, k)) for k in keys}
        ends: dict[str, tuple[float, str]] = {}

        async def on_commit(msg: Msg) -> None:
            now = time.perf_counter()
            if not any(m in msg.data for m in TERMINAL_MARKERS):
                return
            run_id = s.parse_run_events(msg.subject)[1]
            if run_id in ends:
                return
            for envelope in json.loads(msg.data)["events"]:
                if envelope["type"] in TERMINAL_EVENTS:
                    ends[run_id] = (now, envelope["type"])
                    return

        sub = await self.nc.subscribe(s.tenant_events(T2), cb=on_commit, pending_msgs_limit=1_000_000,
                                      pending_bytes_limit=1024 * 1024 * 1024)
        try:
            cpu0 = cpu_seconds(pids)
            wall0 = time.time()
            clock = Clock()
            await asyncio.gather(*(client.start_run(WF_FIVE, {"n": 1}, key=k, check=False) for k in keys))
            submit_s = clock.elapsed()
            progress(f"W2: {count} triggers published in {submit_s:.2f} s")
            last_report = 0.0
            last_progress = (0, clock.elapsed())
            while len(ends) < count:
                await asyncio.sleep(0.05)
                now = clock.elapsed()
                if now - last_report >= 2:
                    last_report = now
                    progress(f"W2: {len(ends)}/{count} runs ended ({now:.1f} s)")
                    self.check_alive()
                if len(ends) != last_progress[0]:
                    last_progress = (len(ends), now)
                elif now - last_progress[1] > 60:
                    raise RuntimeError(f"W2 stalled: {len(ends)}/{count} runs ended, none in the last 60 s")
            done_at = time.perf_counter()
            cpu = cpu_report(cpu0, cpu_seconds(pids), done_at - clock.t0)
            seconds = max(end for end, _ in ends.values()) - clock.t0
        finally:
            await sub.unsubscribe()
        failed = sum(kind != ev.RunSucceeded.type_name for _, kind in ends.values())
        steps = count * len(FIVE_STEP_DEPS)
        progress(f"W2: {count} runs in {seconds:.2f} s ({steps / seconds:.0f} steps/s); reading the logs back")
        await asyncio.sleep(0.2)
        slots = asyncio.Semaphore(32)

        async def read(run_id: str) -> tuple[tuple[list[dict[str, Any]], int], float]:
            async with slots:
                return await self.events(T2, run_id), wall0

        logs = await asyncio.gather(*(read(r) for r in sorted(run_ids)))
        analysis = analyse(logs, self.recv, FIVE_STEP_DEPS)
        run_latency = [(end - clock.t0) * 1000 for end, _ in ends.values()]
        result = {
            "runs": count, "steps": steps, "failed_runs": failed, "seconds": round(seconds, 3),
            "submit_seconds": round(submit_s, 3), "runs_per_s": round(count / seconds, 1),
            "steps_per_s": round(steps / seconds, 1), "run_latency_ms": summary(run_latency),
            **analysis, "cpu": cpu,
        }
        result["_done_at"] = done_at
        return result

    # -- W3 --------------------------------------------------------------------------------
    async def w3(self, items: int) -> dict[str, Any]:
        # a small fan-out first, untimed: template and for_each code paths warm
        _, _, _, kind = await self.one_run(WF_FAN, {"items": list(range(3))}, T3, f"w3-warm-{self.nonce}",
                                           timeout=60)
        if kind != ev.RunSucceeded.type_name:
            raise RuntimeError(f"W3 warm-up run ended {kind}: {self.failures[-1:]}")
        run_id, _, secs, kind = await self.one_run(WF_FAN, {"items": list(range(items))}, T3,
                                                      f"w3-{self.nonce}", timeout=600)
        if kind != ev.RunSucceeded.type_name:
            raise RuntimeError(f"W3 run ended {kind}: {self.failures[-1:]}")
        await asyncio.sleep(0.2)
        stored = await self.tenant(T3).read_commits(run_id)
        events = [e for c in stored for e in c.envelopes]
        commits = len(stored)
        by_service: dict[str, int] = {}
        for c in stored:
            svc = c.envelopes[0]["service"]
            by_service[svc] = by_service.get(svc, 0) + 1
        sizes = [len(c.envelopes) for c in stored]
        started = next(parse_at(e["at"]) for e in events if e["type"] == ev.RunStarted.type_name)
        overhead = []
        for e in events:
            if e["type"] == "StepDispatched":
                got = self.recv.get(e["data"]["job_id"])
                if got is not None:
                    overhead.append((got[0] - started) * 1000)
        result = {
            "items": items, "status": kind, "seconds": round(secs, 3), "events": len(events), "commits": commits,
            "commits_by_service": by_service, "max_events_per_commit": max(sizes) if sizes else 0,
            "single_event_commits": sum(1 for n in sizes if n == 1),
            "conflicts": None,
            "conflicts_note": ("the services' EventStore conflict counters live inside the service processes and "
                               "are not exported; commits vs events in the run's log is reported as a proxy "
                               "(how much the appends were batched), not a conflict count"),
            "item_start_after_run_start_ms": summary(overhead),
        }
        progress(f"W3: {items} items in {secs:.2f} s ({len(events)} events in {commits} commits)")
        return result


# -- analysis of run logs ------------------------------------------------------------------------
def analyse(logs: list[tuple[tuple[list[dict[str, Any]], int], float]], recv: dict[str, tuple[float, float]],
            deps: dict[str, list[str]]) -> dict[str, Any]:
    """Scheduling overhead per step and where a step's time goes, from events' ``at`` and worker times.

    Overhead of a step = the worker got its job - ``at`` of its last dependency's StepSucceeded
    (RunStarted for a first step).
    """
    overhead: list[float] = []
    stages: dict[str, list[float]] = {name: [] for name, _ in STAGES}
    submit_to_start: list[float] = []
    finish: list[float] = []
    events_per_run: list[int] = []
    commits_per_run: list[int] = []
    missing_recv = 0
    ready, decided, dispatched_t = ev.StepReady.type_name, ev.PolicyDecided.type_name, ev.StepDispatched.type_name
    succeeded = ev.StepSucceeded.type_name
    for (events, commits), submitted in logs:
        events_per_run.append(len(events))
        commits_per_run.append(commits)
        at: dict[tuple[str, str | None], float] = {}
        for e in events:
            at.setdefault((e["type"], e.get("step_id")), parse_at(e["at"]))
        started = at.get((ev.RunStarted.type_name, None))
        if started is None:
            continue
        submit_to_start.append((started - submitted) * 1000)
        for step, step_deps in deps.items():
            base = max((at.get((succeeded, d), started) for d in step_deps), default=started)
            dispatched = next((e for e in events if e["type"] == dispatched_t and e.get("step_id") == step), None)
            got = recv.get(dispatched["data"]["job_id"]) if dispatched else None
            if got is None:
                missing_recv += 1
                continue
            overhead.append((got[0] - base) * 1000)
            points = [base, at.get((ready, step)), at.get((decided, step)), at.get((dispatched_t, step)),
                      got[0], got[1], at.get((succeeded, step))]
            for (name, _), a, b in zip(STAGES, points, points[1:], strict=False):
                if a is not None and b is not None:
                    stages[name].append((b - a) * 1000)
        last = max((at[(succeeded, d)] for d in deps if (succeeded, d) in at), default=None)
        ended = at.get((ev.RunSucceeded.type_name, None))
        if last is not None and ended is not None:
            finish.append((ended - last) * 1000)
    return {
        "overhead_ms": summary(overhead),
        "overhead_p50_ms": round(percentile(overhead, 50) or 0, 3),
        "overhead_p99_ms": round(percentile(overhead, 99) or 0, 3),
        "stages_ms": {name: {"what": what, **summary(stages[name])} for name, what in STAGES},
        "submit_to_run_started_ms": summary(submit_to_start),
        "last_step_to_run_succeeded_ms": summary(finish),
        "events_per_run": round(sum(events_per_run) / len(events_per_run), 1) if events_per_run else None,
        "commits_per_run": round(sum(commits_per_run) / len(commits_per_run), 1) if commits_per_run else None,
        "steps_without_worker_record": missing_recv,
    }


def memory_report(sampler: RssSampler, baseline: tuple[float, float], during: tuple[float, float],
                  after: tuple[float, float]) -> dict[str, Any]:
    base = sampler.window(*baseline)
    load = sampler.window(*during)
    late = sampler.window(*after)
    if not base or not load or not late:
        return {"error": "not enough RSS samples"}
    base_kb = sum(x[1] for x in base) / len(base)
    peak = max(load, key=lambda x: x[1])
    after_kb = sum(x[1] for x in late) / len(late)
    names = list(base[-1][2])

    def per(samples: list[tuple[float, int, dict[str, int]]]) -> dict[str, float]:
        return {n: _mb(sum(x[2].get(n, 0) for x in samples) / len(samples)) for n in names}

    return {
        "interval_s": sampler.interval,
        "processes": names,
        "baseline_mb": _mb(base_kb),
        "peak_mb": _mb(peak[1]),
        "after_5s_mb": _mb(after_kb),
        "after_vs_baseline": round(after_kb / base_kb, 3),
        "returned_within_20pct": after_kb <= base_kb * 1.2,
        "per_process_mb": {"baseline": per(base), "peak": {n: _mb(v) for n, v in peak[2].items()},
                           "after_5s": per(late)},
        "samples": len(sampler.samples),
    }


def new_home() -> Path:
    return Path(tempfile.mkdtemp(prefix="interlock-bench-"))
