"""``interlock drill``: a chaos drill for invariant 5 of the design.

It starts the whole stack (one NATS server, or with ``--cluster`` a 3-node JetStream cluster
with R3 streams), two copies of the example agents, registers three workflows (a variant of the
incident-remediation example, a fan-out and a retry-heavy one), submits a mixed workload and,
while it runs, SIGKILLs random victims — services, workers and, with ``--cluster``, one NATS
node at a time (the IL_EVENTS stream leader at least once) — restarting each after a short
random pause. The drill approves every approval it sees (with the job hash it was asked for).

Then it checks what the invariant promises:

- every run ended, and (for this workload) succeeded;
- no step outcome (StepSucceeded/StepFailed per step and attempt) is recorded twice, and no step
  succeeded twice;
- every side effect happened once per idempotency key: each ``incident.apply`` step that
  succeeded recorded its key exactly once, and no key was recorded for anything else;
- approvals held: no job was dispatched before its approval was granted (for the hash that was
  asked), an approval step succeeded only after its grant, jobs behind an approval step were
  dispatched only after it succeeded, and no job was dispatched without a policy decision;
- every run's log verifies (hash chain, gap-free seq, starts with RunStarted) and ends with
  exactly one terminal event (only late results of abandoned attempts may follow it).
- with workload limits on (``INTERLOCK_GATE_LIMITS`` in the drill's environment, which its
  services inherit), no topic with a concurrency limit, and not the drill's tenant, ever had more
  jobs in flight than its limit, read from the runs' logs (StepDispatched to outcome).

The report gives kills by kind, the runs' outcomes, the time to resume after each kill (from
the kill to the next event appended to any of the drill's runs; p50 and max), the time until
every run in flight at the kill moved again (p50, p99 and max, separately for service and worker
kills and for NATS node kills, judged against :data:`STALL_GOALS`; a run that only waited for a
workload limit's slot counts by how long a slot stood free while it still waited, since waiting
while the slot is taken is by design) and every violation. The exit
code is non-zero on any violation (a missed stall goal is reported, not an exit code).

Each run-path service (planner, policy, approval, dispatcher) runs ``copies`` processes (default
2; the auditor one): a kill takes one copy, and its held messages go to the others within the
consumers' ack wait (:mod:`interlock.contracts.timing`). With ``--copies 1`` a killed service's
work waits for its restart (the drill's pause of 0.2-1.5 s plus the process's start-up).

With ``--nats URL`` the drill targets a stack that is already running: it starts its own two
example-agent workers against it and kills only those (it never touches processes it did not
start). The target must not run other workers for the ``incident.*`` topics (they would take
jobs whose side effects the drill cannot see), and if approvers are registered there, grant
the drill's approver (``interlock approver grant drill sre-oncall approver``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import nats.errors
import yaml
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from interlock.client import TERMINAL_EVENTS as TERMINAL
from interlock.client import Client, ClientError, Refused
from interlock.contracts import events as ev
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.contracts.messages import AgentRegistration
from interlock.core import codec
from interlock.core.inflight import in_flight_levels, peak_in_flight
from interlock.core.natsserver import NatsServerError
from interlock.core.verify import verify_envelopes
from interlock.core.workflow import Workflow, load_workflow
from interlock.core.workload import GateLimits
from interlock.devstack import example_file
from interlock.devstack.stack import Stack
from interlock.identity import creds_inbox_prefix
from interlock.runtime.connect import home_dir
from interlock.runtime.consumer import PullConsumer

OUTCOMES = ev.kinds(ev.StepSucceeded, ev.StepFailed)
EFFECT_TOPIC = "incident.apply"  # the example agent that records a side effect when it succeeds
APPROVER = "drill"
DRILL_RETRIES = {"max_attempts": 10, "backoff_ms": 100, "max_backoff_ms": 1000}
HEARTBEAT_TIMEOUT_MS = 3000  # a killed worker's job times out and is retried after this
JOB_TIMEOUT_MS = 20_000  # the backstop for an attempt that never heartbeats (see the report's stalls)
STALL_S = 10.0  # a pause this long between two events of a running run is reported
APPROVE_TIMEOUT_S = 1.5
READY_TIMEOUT_S = 120.0  # how long a restarted process may take to serve again
SERVICE_STARTED = " started ("  # what a service logs once it consumes (interlock.runtime.service)
RUN_PATH_SERVICES = ("planner", "policy", "approval", "dispatcher")  # the auditor is not on a run's path
DEFAULT_COPIES = 2
# kill kind -> the p99 of "every in-flight run moving again" the drill should stay within (seconds)
STALL_GOALS = {"service or worker": 2.0, "IL_EVENTS leader": 7.0, "other NATS node": 7.0}

# -- the workload ------------------------------------------------------------------------------
_RETRIES = "{" + ", ".join(f"{k}: {v}" for k, v in DRILL_RETRIES.items()) + "}"
_JOB = f"retries: {_RETRIES}, heartbeat_timeout_ms: {HEARTBEAT_TIMEOUT_MS}, timeout_ms: {JOB_TIMEOUT_MS}"
_JOB_BLOCK = _JOB.replace(", ", "\n    ").replace(_RETRIES.replace(", ", "\n    "), _RETRIES)  # as a step's lines

FANOUT_WORKFLOW = f"""
id: drill-fanout
version: 1
description: detect, scan every host in parallel, patch every scanned host in parallel, tell.
steps:
  detect: {{topic: incident.detect, {_JOB}, input: {{alert: "{{{{ input.alert }}}}"}}}}
  scan:
    topic: incident.enrich
    depends_on: [detect]
    for_each: "input.hosts"
    max_parallel: 3
    {_JOB_BLOCK}
    input: {{host: "{{{{ item }}}}"}}
  patch:
    topic: incident.apply
    depends_on: [scan]
    for_each: "steps.scan.output"
    max_parallel: 4
    {_JOB_BLOCK}
    input: {{plan: {{patch_id: "PATCH-{{{{ item.host }}}}"}}}}
  tell:
    type: notify
    depends_on: [patch]
    channel: drill
    message: "fan-out for {{{{ input.alert.id }}}} done"
"""

RETRY_WORKFLOW = f"""
id: drill-retry
version: 1
description: every step fails its first attempt; one job needs approval by flag, one by policy.
steps:
  first: {{topic: {EFFECT_TOPIC}, {_JOB}, input: {{plan: {{patch_id: "R1-{{{{ input.n }}}}"}}}}}}
  left: {{topic: {EFFECT_TOPIC}, depends_on: [first], {_JOB}, input: {{plan: {{patch_id: "R2-{{{{ input.n }}}}"}}}}}}
  right:
    topic: {EFFECT_TOPIC}
    depends_on: [first]
    require_approval: true
    {_JOB_BLOCK}
    input: {{plan: {{patch_id: "R3-{{{{ input.n }}}}"}}}}
  last:
    topic: {EFFECT_TOPIC}
    depends_on: [left, right]
    labels: {{risk: high}}
    {_JOB_BLOCK}
    input: {{plan: {{patch_id: "R4-{{{{ input.n }}}}"}}}}
"""


def incident_workflow() -> str:
    """The example workflow with retries and a short heartbeat timeout on every job, so a job
    whose worker was killed comes back; registered under its own id, without its trigger."""
    raw = yaml.safe_load(example_file("workflow.yaml").read_text())
    raw["id"] = "drill-incident-remediation"
    raw["name"] = "Incident remediation (drill)"
    raw.pop("triggers", None)
    for step in raw["steps"].values():
        if step.get("type", "job") == "job":
            retries = dict(step.get("retries") or {})
            retries["max_attempts"] = max(int(retries.get("max_attempts", 1)), DRILL_RETRIES["max_attempts"])
            retries.setdefault("backoff_ms", DRILL_RETRIES["backoff_ms"])
            retries.setdefault("max_backoff_ms", DRILL_RETRIES["max_backoff_ms"])
            step["retries"] = retries
            step["heartbeat_timeout_ms"] = HEARTBEAT_TIMEOUT_MS
            step.setdefault("timeout_ms", JOB_TIMEOUT_MS)
    return yaml.safe_dump(raw, sort_keys=False)


def workflows() -> dict[str, str]:
    """The drill's workflows; each version is a digest of its text, so that a changed definition
    registers as a new version on a long-lived stack (``--nats``) instead of conflicting."""
    texts = {"drill-incident-remediation": incident_workflow(), "drill-fanout": FANOUT_WORKFLOW,
             "drill-retry": RETRY_WORKFLOW}
    out = {}
    for wf_id, text in texts.items():
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        out[wf_id] = re.sub(r"(?m)^version: .*$", f"version: d{digest}", text, count=1)
    return out


def run_input(kind: str, n: int, rng: random.Random) -> dict[str, Any]:
    alert = {"id": f"DRILL-{n}", "host": f"web-{rng.randrange(1, 40)}", "service": "checkout",
             "symptom": rng.choice(["5xx spike after deploy", "latency p99 over SLO"])}
    if kind == "drill-fanout":
        return {"alert": alert, "hosts": [f"db-{n}-{i}" for i in range(rng.randrange(2, 6))]}
    if kind == "drill-retry":
        return {"n": n}
    return {"alert": alert}


# -- the report --------------------------------------------------------------------------------
@dataclass
class Kill:
    victim: str
    kind: str  # service | worker | nats
    at: float  # wall clock (time.time()) of the SIGKILL
    offset: float  # seconds since the drill's workload started
    down_s: float = 0.0  # until the restart
    note: str = ""  # e.g. "IL_EVENTS leader"
    heal_s: float | None = None  # a NATS node: from its restart until every stream replica is current
    ready_s: float | None = None  # a process: from its restart until it serves again
    resume_s: float | None = None  # kill -> next event appended to any drill run
    in_flight: int = 0  # runs started and not ended at the kill
    throttled: int = 0  # of them, runs that only waited for a workload limit's slot (see _gate_wait)
    slowest: str = ""  # the run that moved last, and what it waited for
    all_moving_s: float | None = None  # kill -> every run in flight at the kill has a new event


@dataclass
class DrillReport:
    runs: int
    kills_planned: int
    cluster: bool
    seed: int
    tenant: str
    home: str
    target: str = ""  # --nats: the stack the drill ran against
    kills: list[Kill] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    events: int = 0
    retries: int = 0  # StepFailed (not final) + StepTimedOut: attempts that had to be repeated
    timeouts: int = 0
    late_results: int = 0
    crashes: list[str] = field(default_factory=list)  # processes that exited without being killed
    deadline_timeouts: int = 0  # attempts recovered only by their deadline: no lease was ever running
    stalls: list[tuple[float, str]] = field(default_factory=list)  # (seconds, where) of pauses > STALL_S
    run_seconds: list[float] = field(default_factory=list)
    approvals: int = 0
    effects: int = 0
    workload_s: float = 0.0
    total_s: float = 0.0

    copies: int = 1  # processes per run-path service

    @property
    def ok(self) -> bool:
        return not self.violations and not self.crashes

    def moving_by_goal(self) -> dict[str, list[float]]:
        """Seconds until every run in flight at a kill moved again, per kind of kill of STALL_GOALS."""
        groups: dict[str, list[float]] = {goal: [] for goal in STALL_GOALS}
        for k in self.kills:
            if k.all_moving_s is None:
                continue
            if k.kind != "nats":
                groups["service or worker"].append(k.all_moving_s)
            elif f"{s.EVENTS_STREAM} leader" in k.note:
                groups["IL_EVENTS leader"].append(k.all_moving_s)
            else:
                groups["other NATS node"].append(k.all_moving_s)
        return groups

    def stall_goal_met(self) -> bool:
        """Every kind of kill that happened stayed within its goal at the p99."""
        return all(percentile(times, 99) <= STALL_GOALS[goal] for goal, times in self.moving_by_goal().items()
                   if times)

    def resume_times(self) -> list[float]:
        return [k.resume_s for k in self.kills if k.resume_s is not None]

    def all_moving_times(self) -> list[float]:
        return [k.all_moving_s for k in self.kills if k.all_moving_s is not None]

    def render(self) -> str:
        where = (f"running stack at {self.target} (only the drill's own workers are killed)" if self.target
                 else "3-node cluster, R3 streams" if self.cluster else "single NATS node")
        copies = f", {self.copies} copies of {'/'.join(RUN_PATH_SERVICES)}" if not self.target else ""
        lines = [f"interlock drill — {where}{copies}, "
                 f"seed {self.seed}, tenant {self.tenant}, home {self.home}"]
        by_kind = Counter(k.kind for k in self.kills)
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(by_kind.items())) or "none"
        lines.append(f"kills: {len(self.kills)} of {self.kills_planned} planned ({kinds})")
        by_victim = Counter(k.victim for k in self.kills)
        lines.append("  victims: " + (", ".join(f"{v} x{n}" for v, n in sorted(by_victim.items())) or "none"))
        for k in self.kills:
            resume = f"{k.resume_s * 1000:7.0f} ms" if k.resume_s is not None else "      n/a"
            if k.all_moving_s is not None:
                resume += f", all {k.in_flight:3d} in-flight runs moving after {k.all_moving_s:5.1f}s"
                if k.throttled:
                    resume += f" ({k.throttled} throttled)"
                if k.slowest:
                    resume += f"; slowest: {k.slowest}"
            extra = [k.note] if k.note else []
            if k.heal_s is not None:
                extra.append(f"caught up {k.heal_s:.1f}s after restart")
            if k.ready_s is not None:
                extra.append(f"serving {k.ready_s:.1f}s after restart")
            lines.append(f"  +{k.offset:6.1f}s  {k.kind:<7} {k.victim:<11} down {k.down_s:4.1f}s  "
                         f"resume {resume}{'  (' + '; '.join(extra) + ')' if extra else ''}")
        times = self.resume_times()
        if times:
            lines.append(f"time to resume after a kill (next event of any run): p50 "
                         f"{statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms (n={len(times)})")
        moving = self.all_moving_times()
        if moving:
            lines.append(f"time until every run in flight at the kill moved again: p50 "
                         f"{statistics.median(moving):.1f}s, max {max(moving):.1f}s (n={len(moving)})")
            for goal, times in self.moving_by_goal().items():
                if not times:
                    continue
                p99 = percentile(times, 99)
                verdict = "PASS" if p99 <= STALL_GOALS[goal] else "MISS"
                lines.append(f"  after {goal} kills: p50 {percentile(times, 50):.2f}s, p99 {p99:.2f}s, "
                             f"max {max(times):.2f}s (n={len(times)}; goal p99 <= {STALL_GOALS[goal]:g}s: {verdict})")
            lines.append(f"stall goal: {'PASS' if self.stall_goal_met() else 'MISS'} "
                         f"(p99 by nearest rank: the max while n < 100)")
        outcome = ", ".join(f"{n} {t.removeprefix('Run').lower()}" for t, n in sorted(self.outcomes.items()))
        lines.append(f"runs: {self.runs} submitted (+1 warm-up); {outcome or 'none ended'}; "
                     f"workload {self.workload_s:.1f}s, drill {self.total_s:.1f}s")
        lines.append(f"events: {self.events}; failed attempts retried {self.retries} (of them timeouts "
                     f"{self.timeouts}); "
                     f"late results {self.late_results}; approvals granted {self.approvals}; "
                     f"side effects {self.effects}")
        if self.run_seconds:
            lines.append(f"run duration: p50 {statistics.median(self.run_seconds):.1f}s, "
                         f"max {max(self.run_seconds):.1f}s")
        if self.stalls:
            lines.append(f"stalls: {len(self.stalls)} pause(s) over {STALL_S:g}s inside running runs "
                         f"(the longest first):")
            lines.extend(f"  {secs:6.1f}s  {where}" for secs, where in sorted(self.stalls, reverse=True)[:10])
        if self.deadline_timeouts:
            lines.append(f"attempts recovered only by their deadline ({JOB_TIMEOUT_MS / 1000:g}s; no heartbeat "
                         f"ever arrived, so no lease ran): {self.deadline_timeouts}")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.crashes:
            lines.append(f"CRASHES ({len(self.crashes)}): processes that exited without being killed "
                         f"(restarted by the drill):")
            lines.extend(f"  - {c}" for c in self.crashes)
        if self.violations:
            lines.append(f"VIOLATIONS ({len(self.violations)}):")
            lines.extend(f"  - {v}" for v in self.violations[:200])
            if len(self.violations) > 200:
                lines.append(f"  … and {len(self.violations) - 200} more")
        elif not self.crashes:
            lines.append("no violations: every run finished, nothing lost or recorded twice")
        else:
            lines.append("no violations in the runs' logs, but processes crashed (above)")
        return "\n".join(lines)


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile (an observed value; the max while len(values) < 100 / (100 - pct))."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


# -- live state, fed by a consumer of the drill tenant's events -------------------------------
@dataclass
class Approval:
    run_id: str
    step_id: str
    job_hash: str
    role: str
    sent_at: float = 0.0
    tries: int = 0
    last_error: str = ""


class Monitor:
    """Follows every commit of the drill's runs: ends, approvals asked and granted, timestamps."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.ended: dict[str, str] = {}
        self.pending: dict[tuple[str, str], Approval] = {}
        self.granted: set[tuple[str, str, str]] = set()
        self.stamps: list[float] = []  # server time of every commit (epoch seconds)
        self.run_stamps: dict[str, list[float]] = defaultdict(list)  # the same, per run
        self.seen_commits: set[int] = set()
        self.events = 0
        self.changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        meta = msg.metadata
        if meta.sequence.stream not in self.seen_commits:
            self.seen_commits.add(meta.sequence.stream)
            stamp = meta.timestamp.timestamp()
            self.stamps.append(stamp)
            self.run_stamps[s.parse_run_events(msg.subject)[1]].append(stamp)
            for envelope in codec.decode_commit_raw(msg.data)["events"]:
                self.on_event(envelope)
        with contextlib.suppress(Exception):
            await msg.ack()

    def on_event(self, e: dict[str, Any]) -> None:
        self.events += 1
        run_id, kind, data = e["run_id"], e["type"], e.get("data") or {}
        if kind in TERMINAL:
            self.ended[run_id] = kind
            self.changed.set()
        elif kind == ev.ApprovalRequested.type_name:
            self.pending[(run_id, data["step_id"])] = Approval(run_id, data["step_id"], data["job_hash"],
                                                               data["approver_role"])
        elif kind == ev.ApprovalGranted.type_name:
            self.granted.add((run_id, data["step_id"], data["job_hash"]))
            self.pending.pop((run_id, data["step_id"]), None)
        elif kind in (ev.ApprovalRejected.type_name, ev.ApprovalExpired.type_name):
            self.pending.pop((run_id, data["step_id"]), None)


# -- the drill -------------------------------------------------------------------------------
Progress = Callable[[str], None]


def _print(text: str) -> None:
    print(text, flush=True)


async def run_drill(*, runs: int = 200, kills: int = 20, cluster: bool = False, seed: int | None = None,
                    timeout: float = 600.0, home: Path | str | None = None, nats_url: str | None = None,
                    copies: int = DEFAULT_COPIES, progress: Progress = _print) -> DrillReport:
    """Run the drill and return its report (see the module docstring)."""
    seed = seed if seed is not None else random.randrange(1_000_000)
    rng = random.Random(seed)
    home = Path(home) if home else Path(tempfile.mkdtemp(prefix="interlock-drill-"))
    home.mkdir(parents=True, exist_ok=True)
    tenant = f"drill-{uuid.UUID(int=rng.getrandbits(128)).hex[:10]}"
    effects_file = home / f"side-effects-{tenant}.jsonl"
    report = DrillReport(runs=runs, kills_planned=kills, cluster=cluster and not nats_url, seed=seed, tenant=tenant,
                         home=str(home), target=nats_url or "", copies=copies)
    t_start = time.monotonic()
    agents = f"{example_file('agents.py')}:worker"
    # the drill's workers take the drill tenant's jobs (INTERLOCK_TENANT is a worker setting)
    env = {"INTERLOCK_SIDE_EFFECTS": str(effects_file), "INTERLOCK_AUDITOR_DB": str(home / "auditor.sqlite3"),
           "INTERLOCK_TENANT": tenant}
    if nats_url:
        if cluster:
            report.notes.append("--cluster ignored with --nats: the drill kills only the workers it started")
        # the running stack's identity home issues the drill's credentials (its server trusts it)
        stack = Stack(home=home, nats_url=nats_url, services=(), workers=[agents, agents], env=env, tenant=tenant,
                      identity_dir=Path(os.environ.get("INTERLOCK_IDENTITY_HOME") or home_dir() / "identity"))
    else:
        stack = Stack(home=home, port=0, workers=[agents, agents], env=env, cluster=3 if cluster else 0,
                      tenant=tenant, copies=dict.fromkeys(RUN_PATH_SERVICES, copies))
    try:
        progress(f"drill: seed {seed}, {runs} runs, {kills} kills, "
                 f"{'target ' + nats_url if nats_url else ('3-node cluster' if cluster else 'single node')}, "
                 f"home {home}")
        url = await asyncio.to_thread(stack.start_nats)
        if not nats_url:
            await stack.provision()
        stack.start()
        progress(f"drill: nats {url}; processes {', '.join(stack.procs)}"
                 + (f"; nodes {', '.join(stack.nodes)}" if stack.nodes else ""))
        await _drill(stack, report, rng, runs=runs, kills=kills, timeout=timeout, effects_file=effects_file,
                     progress=progress, own_stack=not nats_url)
    finally:
        await asyncio.to_thread(stack.stop)
        report.total_s = time.monotonic() - t_start
    return report


async def _retrying(what: str, call: Callable[[], Any], patience: float = 60.0) -> Any:
    deadline = time.monotonic() + patience
    while True:
        try:
            return await call()
        except Exception as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} failed for {patience:.0f}s: {e!r}") from e
            await asyncio.sleep(0.25)


async def _drill(stack: Stack, report: DrillReport, rng: random.Random, *, runs: int, kills: int, timeout: float,
                 effects_file: Path, progress: Progress, own_stack: bool) -> None:
    tenant = report.tenant
    # node kills are the point of the drill: the client reconnects for as long as it lives
    # the drill's client is an admin of the drill tenant named APPROVER: its decisions are the
    # approver's (the server accepts a credential's commands only under its own name)
    creds = await asyncio.to_thread(stack.identity.get_or_issue, "admin", tenant, name=APPROVER)
    client = await Client.connect(stack.url, tenant=tenant, name="interlock-drill", patient=True, creds=creds)
    # an approval asked of a copy that is killed before it answers is asked again (of another
    # copy) after this, not after the default 5 s; a repeated decision is refused, never recorded twice
    client.request_timeout = APPROVE_TIMEOUT_S
    nc, js = client.nc, client.js
    # the approval service trusts the approver's signatures once its key is in the keyring
    await _retrying("publishing the keyring", stack.publish_keyring, patience=timeout)
    monitor = Monitor(tenant)
    # one of the drill principal's own consumer names: only those may it ack (an un-acked monitor
    # would have every event redelivered to it, a load of its own on the server under test)
    owner = creds_inbox_prefix(creds).removeprefix(f"{p.INBOX_ROOT}.")
    durable = p.principal_consumer(owner, p.PRINCIPAL_CONSUMER_SLOTS - 1)
    consumer = PullConsumer(nc, js, stream=s.EVENTS_STREAM, durable=durable,
                            subject=s.tenant_events(tenant), handler=monitor.on_msg, concurrency=256, ack_wait=30)
    tasks: list[asyncio.Task[Any]] = []
    try:
        defs: dict[str, Workflow] = {}
        for wf_id, text in workflows().items():
            defs[wf_id] = load_workflow(text)
            wf, created = await _retrying(f"registering {wf_id}", functools.partial(client.apply_workflow, text))
            progress(f"drill: workflow {wf.id} v{wf.version} {'registered' if created else 'already registered'}")
        dlq_before = await _stream_last_seq(js, s.DLQ_STREAM)
        await _retrying("starting the drill's event consumer", consumer.start)

        # a warm-up run: the services and workers are up and serving before the clock starts
        t_warm = time.monotonic()
        run_ids: dict[str, str] = {}
        warm_key = f"{tenant}-warmup"
        warm_id = await client.start_run("drill-fanout", run_input("drill-fanout", -1, rng), key=warm_key,
                                         requested_by="drill", check=False, patience=120)
        run_ids[warm_id] = "drill-fanout"
        while warm_id not in monitor.ended:
            dead = stack.dead()
            if dead:
                name = dead[0]
                raise RuntimeError(f"{name} exited while the stack was starting: "
                                   f"{await asyncio.to_thread(_last_error, stack.procs[name].log_path)}")
            if time.monotonic() - t_warm > 120:
                raise RuntimeError("the warm-up run did not end within 120s: is the stack serving? "
                                   f"(logs in {stack.home / 'logs'})")
            await asyncio.sleep(0.1)
        progress(f"drill: stack serving (warm-up run {monitor.ended[warm_id]} after "
                 f"{time.monotonic() - t_warm:.1f}s); starting the workload and the kills")

        # the workload: spread over the kill phase so that kills land on runs in flight
        kinds = [k for k, weight in (("drill-incident-remediation", 4), ("drill-fanout", 3), ("drill-retry", 3))
                 for _ in range(weight)]
        plan = [(rng.choice(kinds), n) for n in range(runs)]
        # seconds per kill (kill, pause, restart, gap; a NATS node also has to catch up), first
        # guessed, then measured: the submissions are spread to last as long as the kills do
        per_kill = 4.5 if stack.nodes else 1.6
        window = max(3.0, kills * per_kill)
        t0 = time.monotonic()
        submitted_all = asyncio.Event()

        async def submit() -> None:
            for i, (wf_id, n) in enumerate(plan):
                if i and kills:
                    now = time.monotonic()
                    done = len(report.kills)
                    pace = (now - t0) / done if done >= 2 else per_kill
                    remaining = max(0.0, (kills - done + 0.5) * pace)
                    if not kill_done.is_set():
                        await asyncio.sleep(min(remaining / max(1, runs - i), 2 * per_kill))
                elif i:
                    await asyncio.sleep(window / runs)
                key = f"{tenant}-{n}"
                run_id = await client.start_run(wf_id, run_input(wf_id, n, rng), key=key, requested_by="drill",
                                                check=False, patience=120)
                run_ids[run_id] = wf_id
            submitted_all.set()

        async def approve() -> None:
            while True:
                now = time.monotonic()
                due = [a for a in list(monitor.pending.values())
                       if (a.run_id, a.step_id, a.job_hash) not in monitor.granted and now - a.sent_at > 3.0]
                if due:
                    await asyncio.gather(*(_decide(client, a) for a in due[:64]))
                else:
                    await asyncio.sleep(0.1)

        kill_done = asyncio.Event()

        async def chaos() -> None:
            try:
                await _chaos(stack, report, rng, kills, t0, window, own_stack, nc, progress, down)
            finally:
                kill_done.set()

        async def show() -> None:
            while True:
                await asyncio.sleep(3.0)
                ended = [monitor.ended[r] for r in run_ids if r in monitor.ended]
                progress(f"  +{time.monotonic() - t0:5.1f}s  submitted {len(run_ids) - 1}/{runs}  ended {len(ended)} "
                         f"(succeeded {ended.count('RunSucceeded')})  awaiting approval {len(monitor.pending)}  "
                         f"kills {len(report.kills)}/{kills}  events {monitor.events}")

        down: set[str] = set()  # what the drill has killed and not restarted yet

        async def supervise() -> None:
            # a process that exits by itself (not one the drill killed) is a crash: report it and
            # start it again, the way `interlock up` would
            while True:
                await asyncio.sleep(0.5)
                for name in stack.dead():
                    if name in down:
                        continue
                    proc = stack.procs[name]
                    code = proc.popen.returncode if proc.popen is not None else None
                    last = await asyncio.to_thread(_last_error, proc.log_path)
                    report.crashes.append(f"{name} exited by itself (code {code}) at "
                                          f"+{time.monotonic() - t0:.1f}s: {last}")
                    progress(f"  +{time.monotonic() - t0:5.1f}s  CRASH {name} exited by itself (code {code}): "
                             f"{last}; restarting it")
                    stack.restart(name)

        tasks = [asyncio.create_task(c) for c in (submit(), approve(), chaos(), show(), supervise())]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if submitted_all.is_set() and kill_done.is_set() and all(r in monitor.ended for r in run_ids):
                break
            monitor.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(monitor.changed.wait(), 0.5)
        report.workload_s = time.monotonic() - t0
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not kill_done.is_set():
            report.violations.append(f"the kills did not finish within --timeout {timeout:g}s")
        ungranted = [a for a in monitor.pending.values() if (a.run_id, a.step_id, a.job_hash) not in monitor.granted]
        report.notes.extend(f"approval of {a.step_id} in run {a.run_id} never granted after {a.tries} tries; "
                            f"last answer: {a.last_error or 'none'}" for a in ungranted)
        progress(f"drill: workload over after {report.workload_s:.1f}s; checking {len(run_ids)} runs …")

        logs = await _check(report, client, run_ids, defs, monitor, effects_file)
        _moving_again(report, monitor, logs)
        dlq_after = await _stream_last_seq(js, s.DLQ_STREAM)
        if dlq_after > dlq_before:
            report.notes.append(f"{dlq_after - dlq_before} dead letter(s) written during the drill "
                                f"(`interlock dlq` shows them)")
    finally:
        for task in tasks:
            task.cancel()
        await consumer.stop()
        with contextlib.suppress(Exception):
            await js.delete_consumer(s.EVENTS_STREAM, consumer.durable)
        await client.close()


def _last_error(log_path: Path) -> str:
    """The last line of a crashed process's log that says what went wrong, and where in Interlock."""
    try:
        with log_path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16_000))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    noise = ("Traceback", "The above", "During handling")
    errors = [line for line in lines if line and not line[0].isspace() and not line.startswith(noise)]
    frames = [line.strip() for line in lines if line.strip().startswith("File ") and "/interlock/" in line]
    where = f" [{frames[-1]}]" if frames else ""
    return (errors[-1][:200] if errors else "(empty log)") + where


async def _stream_last_seq(js: Any, stream: str) -> int:
    with contextlib.suppress(NotFoundError, Exception):
        info = await js.stream_info(stream)
        return int(info.state.last_seq)
    return 0


async def _decide(client: Client, a: Approval) -> None:
    a.sent_at = time.monotonic()
    a.tries += 1
    try:
        await client.approve(a.run_id, a.step_id, role=a.role, job_hash=a.job_hash,
                             reason="chaos drill")
    except Refused as e:
        a.last_error = str(e)
    except (ClientError, nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as e:
        a.last_error = str(e) or repr(e)  # the approval service is down or restarting: asked again later
        a.sent_at = time.monotonic() - 2.5


# -- kills -----------------------------------------------------------------------------------
async def _chaos(stack: Stack, report: DrillReport, rng: random.Random, kills: int, t0: float, window: float,
                 own_stack: bool, nc: NATS, progress: Progress, down: set[str]) -> None:
    workers = [name for name in stack.procs if name.startswith("worker-")]
    services = [name for name in stack.service_processes() if name in stack.procs] if own_stack else []
    nodes = stack.nodes if own_stack else []
    leader_kill = rng.randrange(kills) if nodes and kills else -1
    await asyncio.sleep(min(1.0, window / max(1, kills)))
    for i in range(kills):
        if i == leader_kill:
            victim = await stack.local_cluster.stream_leader(s.EVENTS_STREAM, nc) if stack.local_cluster else ""
            kind, note = "nats", f"{s.EVENTS_STREAM} leader"
        else:
            pool = [("service", v) for v in services] + [("worker", v) for v in workers]
            weights = [1.0] * len(pool)
            if nodes:
                pool += [("nats", v) for v in nodes]
                weights += [len(pool) / (3 * len(nodes))] * len(nodes)  # about a quarter of kills
            kind, victim = rng.choices(pool, weights)[0]
            note = ""
            if kind == "nats" and stack.local_cluster is not None:
                with contextlib.suppress(Exception):
                    leader = await stack.local_cluster.stream_leader(s.EVENTS_STREAM, nc, timeout=2)
                    if leader == victim:
                        note = f"{s.EVENTS_STREAM} leader"
        pause = rng.uniform(0.2, 1.5)
        at = time.time()
        down.add(victim)
        await asyncio.to_thread(stack.kill, victim)
        kill = Kill(victim=victim, kind=kind, at=at, offset=time.monotonic() - t0, note=note)
        report.kills.append(kill)
        progress(f"  +{kill.offset:5.1f}s  SIGKILL {victim} ({kind}{', ' + note if note else ''}); "
                 f"restart in {pause:.1f}s")
        await asyncio.sleep(pause)
        log_path = stack.procs[victim].log_path if victim in stack.procs else None
        logged = log_path.stat().st_size if log_path is not None and log_path.exists() else 0
        await asyncio.to_thread(stack.restart, victim)
        down.discard(victim)
        kill.down_s = time.time() - at
        if kind in ("service", "worker"):
            # one failure at a time: the next kill waits until the restarted process serves again
            # (as a NATS node's kill waits for it to catch up); under load a start takes seconds
            t = time.monotonic()
            if await _serving(stack, victim, kind, logged, nc, report.tenant):
                kill.ready_s = time.monotonic() - t
            else:
                report.notes.append(f"{victim} did not serve again within {READY_TIMEOUT_S:g}s of its restart")
        if kind == "nats" and stack.local_cluster is not None:
            # one node at a time: the restarted node must have caught up before the next kill
            t = time.monotonic()
            try:
                await stack.local_cluster.wait_healthy(nc=nc, timeout=90)
            except Exception as e:
                report.violations.append(f"the cluster did not recover after killing {victim}: {e}")
                return
            kill.heal_s = time.monotonic() - t
            progress(f"  +{time.monotonic() - t0:5.1f}s  {victim} back and current "
                     f"({kill.heal_s:.1f}s after restart)")
        await asyncio.sleep(rng.uniform(0.3, 1.6))


async def _serving(stack: Stack, name: str, kind: str, log_offset: int, nc: NATS, tenant: str) -> bool:
    """Whether the restarted process ``name`` serves again within READY_TIMEOUT_S: a service has
    logged that it started (after ``log_offset``), a worker has put its pid in the agent registry."""
    proc = stack.procs[name]
    deadline = time.monotonic() + READY_TIMEOUT_S
    kv = await nc.jetstream().key_value(s.AGENTS_BUCKET) if kind == "worker" else None
    while time.monotonic() < deadline:
        if not proc.alive():
            return False  # the supervisor reports and restarts it
        if kv is None:
            if await asyncio.to_thread(_logged_since, proc.log_path, log_offset, SERVICE_STARTED):
                return True
        else:
            with contextlib.suppress(Exception):
                for key in await kv.keys():
                    entry = await kv.get(key)
                    if key.startswith(f"{tenant}.") and AgentRegistration.model_validate_json(
                            entry.value or b"{}").pid == (proc.popen.pid if proc.popen else -1):
                        return True
        await asyncio.sleep(0.1)
    return False


def _logged_since(path: Path, offset: int, marker: str) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return marker.encode() in f.read()
    except OSError:
        return False


# -- checks ----------------------------------------------------------------------------------
async def _check(report: DrillReport, client: Client, run_ids: dict[str, str], defs: dict[str, Workflow],
                 monitor: Monitor, effects_file: Path) -> dict[str, list[dict[str, Any]]]:
    """Check every run's log (the module docstring); returns the logs by run id."""
    tenant = report.tenant
    succeeded_effect_keys: set[str] = set()
    violations = report.violations
    by_run: dict[str, list[dict[str, Any]]] = {}
    logs: list[list[dict[str, Any]]] = []  # every run's events, for the limits
    report.approvals = len(monitor.granted)
    for run_id, wf_id in sorted(run_ids.items()):
        commits = await _retrying(f"reading run {run_id}", functools.partial(client.read_commits, run_id))
        events = [e for c in commits for e in c.envelopes]
        logs.append(events)
        by_run[run_id] = events
        report.events += len(events)
        where = f"run {run_id} ({wf_id})"
        if not events:
            violations.append(f"{where}: no events at all (the trigger was lost)")
            report.outcomes["(never started)"] += 1
            continue
        ends = [i for i, e in enumerate(events) if e["type"] in TERMINAL]
        final = events[ends[0]]["type"] if ends else "(not ended)"
        report.outcomes[final] += 1
        if not ends:
            violations.append(f"{where}: did not end; last events {[e['type'] for e in events[-4:]]}")
        elif len(ends) > 1:
            violations.append(f"{where}: {len(ends)} terminal events")
        else:
            trailing = [e["type"] for e in events[ends[0] + 1:]]
            if any(t != ev.LateResultRecorded.type_name for t in trailing):
                violations.append(f"{where}: events after {final}: {trailing}")
            report.late_results += trailing.count(ev.LateResultRecorded.type_name)
            if final != ev.RunSucceeded.type_name:
                data = events[ends[0]]["data"]
                violations.append(f"{where}: {final}: {data.get('reason') or data}")
        verified = verify_envelopes(events, run_id=run_id, tenant=tenant)
        violations.extend(f"{where}: chain: {problem}" for problem in verified.problems)

        outcomes = Counter((e["step_id"], e["data"].get("attempt")) for e in events if e["type"] in OUTCOMES)
        violations.extend(f"{where}: outcome of {step} attempt {attempt} recorded {n} times"
                          for (step, attempt), n in outcomes.items() if n > 1)
        wins = Counter(e["step_id"] for e in events if e["type"] == ev.StepSucceeded.type_name)
        violations.extend(f"{where}: step {step} succeeded {n} times" for step, n in wins.items() if n > 1)
        report.retries += sum(1 for e in events if e["type"] == ev.StepFailed.type_name and not e["data"].get("final"))
        timeouts = [e for e in events if e["type"] == ev.StepTimedOut.type_name]
        report.timeouts += len(timeouts)
        report.deadline_timeouts += sum(1 for e in timeouts if e["data"].get("reason") == "deadline")
        _timing(report, events, where)
        violations.extend(f"{where}: {v}" for v in _approval_violations(events, defs[wf_id]))

        topics = {e["step_id"]: e["data"].get("topic") for e in events if e["type"] == ev.StepDispatched.type_name}
        for e in events:
            if e["type"] == ev.StepSucceeded.type_name and topics.get(e["step_id"]) == EFFECT_TOPIC:
                succeeded_effect_keys.add(f"{run_id}:{e['step_id']}")

    violations.extend(_limit_violations(report, logs))
    effects: Counter[str] = Counter()
    text = await asyncio.to_thread(lambda: effects_file.read_text() if effects_file.exists() else "")
    if text:
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                key = json.loads(line)["key"]
                if key.split(":", 1)[0] in run_ids:
                    effects[key] += 1
    report.effects = sum(effects.values())
    for key, n in sorted(effects.items()):
        if n > 1:
            violations.append(f"side effect {key} happened {n} times")
        if key not in succeeded_effect_keys:
            violations.append(f"side effect {key} happened but its step did not succeed")
    missing = sorted(succeeded_effect_keys - set(effects))
    violations.extend(f"side effect {key} missing: its step succeeded without doing it" for key in missing)
    return by_run


def _moving_again(report: DrillReport, monitor: Monitor, logs: dict[str, list[dict[str, Any]]]) -> None:
    """Per kill: the time to the next commit of any drill run, and until every run in flight at
    the kill moved again (server times). A run that only waited for a workload limit's slot at the
    kill (its steps throttled, nothing else pending) waits by design while the slot is taken: it
    counts by the longest stretch after the kill during which a slot it needed was free and it
    still did not move (a wake lost with a killed copy shows there), not by its whole wait."""
    stamps = sorted(monitor.stamps)
    free = _free_slots(report, list(logs.values()))
    for k in report.kills:
        i = bisect.bisect_right(stamps, k.at)
        k.resume_s = (stamps[i] - k.at) if i < len(stamps) else None
        waits: list[tuple[float, str]] = []
        for run_id, run_stamps in monitor.run_stamps.items():
            ordered = sorted(run_stamps)
            j = bisect.bisect_right(ordered, k.at)
            if not 0 < j < len(ordered):  # started before the kill and not over: every run ends
                continue
            events = logs.get(run_id, [])
            groups = _gate_wait(events, k.at)
            if groups and all(g in free for g in groups):
                k.throttled += 1
                waits.append((max(_longest_free(free[g], k.at, ordered[j]) for g in groups),
                              f"run {run_id}, throttled (a slot stood free)"))
            else:
                last = [e for e in events if _at(e) <= k.at][-1:]
                waits.append((ordered[j] - k.at, f"run {run_id}, after {last[0]['type'] if last else '?'} "
                                                 f"{(last[0].get('step_id') or '') if last else ''}".rstrip()))
        k.in_flight = len(waits)
        if waits:
            k.all_moving_s, k.slowest = max(waits)


SCOPE_GROUPS = {"concurrency topic:": "topic", "concurrency tenant:": "tenant"}  # StepThrottled scope -> limit


def _at(e: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(e["at"]).timestamp()
    except (KeyError, ValueError):
        return 0.0


def _gate_wait(events: list[dict[str, Any]], at: float) -> set[tuple[str, str]]:
    """The concurrency limits (``("topic", name)``, ``("tenant", name)``) a run waited for at ``at``
    when that is all it waited for: steps throttled, and no job in flight, released, retrying, or
    waiting for a policy decision or an approval. Empty otherwise (or for a wait of another kind)."""
    throttled: dict[str, tuple[str, str] | None] = {}
    busy: set[tuple[str, str]] = set()  # (what, step id) still pending
    for e in events:
        if _at(e) > at:
            break
        kind, step, data = e["type"], e.get("step_id") or "", e.get("data") or {}
        if kind == ev.StepThrottled.type_name:
            scope = str(data.get("scope") or "")
            prefix = next((p for p in SCOPE_GROUPS if scope.startswith(p)), None)
            throttled[step] = (SCOPE_GROUPS[prefix], scope[len(prefix):]) if prefix else None
            busy -= {("released", step), ("retry", step)}
        elif kind == ev.StepDispatched.type_name:
            throttled.pop(step, None)
            busy -= {("released", step), ("retry", step)}
            busy.add(("job", step))
        elif kind in (ev.StepSucceeded.type_name, ev.StepFailed.type_name, ev.StepTimedOut.type_name):
            busy = {(what, s) for what, s in busy if s != step}  # a retry is scheduled anew
        elif kind == ev.RetryScheduled.type_name:
            busy.add(("retry", step))
        elif kind == ev.StepReady.type_name:
            busy.add(("policy", step))
        elif kind == ev.PolicyDecided.type_name:
            busy.discard(("policy", step))
            if data.get("decision") == "allow":
                busy.add(("released", step))
        elif kind == ev.ApprovalRequested.type_name:
            busy.discard(("released", step))
            busy.add(("approval", step))
        elif kind == ev.ApprovalGranted.type_name:
            busy.discard(("approval", step))
            busy.add(("released", step))
        elif kind in (ev.ApprovalRejected.type_name, ev.ApprovalExpired.type_name):
            busy.discard(("approval", step))
    if busy or not throttled or None in throttled.values():
        return set()
    return {g for g in throttled.values() if g is not None}


FreeSlots = dict[tuple[str, str], list[tuple[float, bool]]]  # limit -> (from when, whether a slot was free)


def _free_slots(report: DrillReport, logs: list[list[dict[str, Any]]]) -> FreeSlots:
    """Per concurrency limit of the drill's stack: from each change on, whether a slot was free."""
    try:
        limits = GateLimits.model_validate_json(os.environ.get("INTERLOCK_GATE_LIMITS") or "{}")
    except ValueError:
        return {}
    out: FreeSlots = {}
    for topic, levels in in_flight_levels(logs, lambda e: e["data"].get("topic")).items():
        cap = limits.topic(str(topic)).concurrency
        if cap is not None:
            out[("topic", str(topic))] = [(when.timestamp(), level < cap) for when, level in levels]
    cap = limits.tenant(report.tenant).concurrency
    if cap is not None:
        levels = in_flight_levels(logs).get(None, [])
        out[("tenant", report.tenant)] = [(when.timestamp(), level < cap) for when, level in levels]
    return out


def _longest_free(changes: list[tuple[float, bool]], start: float, end: float) -> float:
    """The longest stretch within [start, end] during which a slot was free (``changes``: from each
    time on, whether one was)."""
    i = bisect.bisect_right([when for when, _ in changes], start)
    free_now = changes[i - 1][1] if i else True
    since, longest = start, 0.0
    for when, free in changes[i:]:
        if when >= end:
            break
        if free_now and not free:
            longest = max(longest, when - since)
        elif free and not free_now:
            since = when
        free_now = free
    if free_now:
        longest = max(longest, end - since)
    return longest


def _limit_violations(report: DrillReport, logs: list[list[dict[str, Any]]]) -> list[str]:
    """With workload limits on (``INTERLOCK_GATE_LIMITS`` of the drill's stack): no topic and not
    the drill's tenant had more jobs in flight at any instant than its concurrency limit allows,
    read from the runs' logs (:mod:`interlock.core.inflight`)."""
    try:
        limits = GateLimits.model_validate_json(os.environ.get("INTERLOCK_GATE_LIMITS") or "{}")
    except ValueError as e:
        return [f"INTERLOCK_GATE_LIMITS is not valid: {e}"]
    if not limits.topics and not limits.tenants:
        return []
    problems = []
    for topic, peak in sorted(peak_in_flight(logs, lambda e: e["data"].get("topic")).items()):
        cap = limits.topic(str(topic)).concurrency
        if cap is not None:
            report.notes.append(f"limit: topic {topic} had at most {peak} job(s) in flight (limit {cap})")
            if peak > cap:
                problems.append(f"topic {topic}: {peak} jobs in flight at once, over its limit of {cap}")
    cap = limits.tenant(report.tenant).concurrency
    if cap is not None:
        peak = max(peak_in_flight(logs).values(), default=0)
        report.notes.append(f"limit: tenant {report.tenant} had at most {peak} job(s) in flight (limit {cap})")
        if peak > cap:
            problems.append(f"tenant {report.tenant}: {peak} jobs in flight at once, over its limit of {cap}")
    return problems


def _timing(report: DrillReport, events: list[dict[str, Any]], where: str) -> None:
    """Run duration, and pauses between consecutive events over STALL_S (what the run waited on),
    up to the run's terminal event (late results of abandoned attempts may trickle in after it)."""
    ends = [i for i, e in enumerate(events) if e["type"] in TERMINAL]
    events = events[:ends[0] + 1] if ends else events
    stamps = []
    for e in events:
        with contextlib.suppress(KeyError, ValueError):
            stamps.append(datetime.fromisoformat(e["at"]).timestamp())
    if len(stamps) != len(events) or not stamps:
        return
    report.run_seconds.append(stamps[-1] - stamps[0])
    for i in range(1, len(events)):
        gap = stamps[i] - stamps[i - 1]
        if gap > STALL_S:
            before, after = events[i - 1], events[i]
            report.stalls.append((gap, f"{where}: after seq {before['seq']} {before['type']} "
                                       f"{before.get('step_id') or ''} until {after['type']} "
                                       f"{after.get('step_id') or ''}".rstrip()))


def _approval_violations(events: list[dict[str, Any]], wf: Workflow) -> list[str]:
    """Jobs only after their grant; approval steps succeed only after a grant; a policy decision first."""
    out: list[str] = []
    asked: dict[str, set[str]] = defaultdict(set)  # step -> hashes approval was asked for
    granted: dict[str, set[str]] = defaultdict(set)
    held: set[str] = set()  # steps policy said need approval
    decided: set[str] = set()
    done: set[str] = set()
    grants: Counter[tuple[str, str]] = Counter()
    for e in events:
        kind, step, data = e["type"], str(e.get("step_id") or ""), e.get("data") or {}
        if kind == ev.PolicyDecided.type_name:
            decided.add(step)
            if data.get("decision") == "require_approval":
                held.add(step)
        elif kind == ev.ApprovalRequested.type_name:
            asked[step].add(data["job_hash"])
        elif kind == ev.ApprovalGranted.type_name:
            grants[(step, data["job_hash"])] += 1
            if data["job_hash"] not in asked[step]:
                out.append(f"step {step}: granted for hash {data['job_hash'][:12]} that was never asked")
            granted[step].add(data["job_hash"])
        elif kind == ev.StepDispatched.type_name:
            if step not in decided:
                out.append(f"step {step} dispatched without a policy decision")
            if (step in held or asked[step]) and not (granted[step] & asked[step]):
                out.append(f"step {step} dispatched (attempt {data.get('attempt')}) before its approval was granted")
            base = step.split("[", 1)[0]
            spec = wf.steps.get(base)
            for dep in spec.depends_on if spec else ():
                if wf.steps[dep].type == "approval" and dep not in done:
                    out.append(f"step {step} dispatched before approval step {dep} succeeded")
        elif kind == ev.StepSucceeded.type_name:
            spec = wf.steps.get(step.split("[", 1)[0])
            if spec is not None and spec.type == "approval" and not granted[step]:
                out.append(f"approval step {step} succeeded without a grant")
            done.add(step)
    out.extend(f"step {step}: approval granted {n} times for one hash" for (step, _), n in grants.items() if n > 1)
    return out


# -- command line ----------------------------------------------------------------------------
def add_drill_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Declare ``interlock drill`` and its arguments on the CLI's subparsers."""
    help_text = "chaos drill: SIGKILL services, workers (and cluster nodes) under load; check nothing is lost"
    sp: argparse.ArgumentParser = subparsers.add_parser(
        "drill", help=help_text, description=help_text + ". Exits non-zero on any violation.")
    sp.add_argument("--runs", type=int, default=200, help="runs to submit (default %(default)s)")
    sp.add_argument("--kills", type=int, default=20, help="SIGKILLs to deal out (default %(default)s)")
    sp.add_argument("--cluster", action="store_true",
                    help="run a 3-node JetStream cluster with R3 streams and kill NATS nodes too "
                         "(the IL_EVENTS stream leader at least once)")
    sp.add_argument("--seed", type=int, default=None, help="random seed, to repeat a drill (default: random)")
    sp.add_argument("--timeout", type=float, default=600.0,
                    help="give up on runs not ended this many seconds after the workload started "
                         "(default %(default)s)")
    sp.add_argument("--home", default=None, help="state and logs directory (default: a new temporary one)")
    sp.add_argument("--copies", type=int, default=DEFAULT_COPIES,
                    help=f"processes per run-path service ({', '.join(RUN_PATH_SERVICES)}; default %(default)s): a "
                         "kill takes one copy while the others carry on; with 1 a killed service's work waits for "
                         "its restart")
    sp.add_argument("--nats", default=None, metavar="URL",
                    help="target a stack that is already running (comma-separated URLs for a cluster): the drill "
                         "then starts its own two example-agent workers there and kills only those; it never "
                         "kills services or NATS nodes it did not start")
    sp.set_defaults(func=cmd_drill)
    return sp


def cmd_drill(args: argparse.Namespace) -> int:
    """``interlock drill`` from parsed arguments (see :func:`add_drill_parser`)."""
    return drill_command(runs=args.runs, kills=args.kills, cluster=args.cluster, seed=args.seed,
                         timeout=args.timeout, home=args.home, nats_url=args.nats, copies=args.copies)


def drill_command(*, runs: int = 200, kills: int = 20, cluster: bool = False, seed: int | None = None,
                  timeout: float = 600.0, home: Path | str | None = None, nats_url: str | None = None,
                  copies: int = DEFAULT_COPIES) -> int:
    """Run the drill, print its report; the exit code: 0 no violation, 1 violations or a failure, 2 bad arguments."""
    if runs < 1 or kills < 0 or copies < 1:
        print("interlock drill: --runs and --copies must be at least 1 and --kills at least 0", file=sys.stderr)
        return 2
    # the drill's own publishes retry through failovers on purpose: their warnings are noise here
    logging.getLogger("interlock").setLevel(logging.ERROR)
    try:
        report = asyncio.run(run_drill(runs=runs, kills=kills, cluster=cluster, seed=seed, timeout=timeout,
                                       home=home, nats_url=nats_url, copies=copies))
    except (RuntimeError, NatsServerError, ClientError) as e:
        print(f"interlock drill: {e}", file=sys.stderr)
        return 1
    print()
    print(report.render(), flush=True)
    return 0 if report.ok else 1


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run the drill from parsed CLI arguments, or from an argument list (``python -m interlock.devstack.drill``)."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="interlock")
        add_drill_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["drill", *(sys.argv[1:] if args is None else args)])
    return cmd_drill(args)


if __name__ == "__main__":
    sys.exit(main())
