"""The chaos drill at small scale, and a stream-leader kill on a real 3-node cluster.

Invariant 5: any service, worker or single NATS node can be SIGKILLed at any instant and
restarted; every run still finishes, no step outcome is lost or recorded twice, and the timeline
stays complete.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from interlock.client import TERMINAL_EVENTS as TERMINAL
from interlock.client import Client
from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.devstack.drill import DrillReport, run_drill
from interlock.devstack.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent


def _assert_clean(report: DrillReport, runs: int, kills: int) -> None:
    text = report.render()
    print(text)
    assert report.ok, text
    assert report.outcomes == {ev.RunSucceeded.type_name: runs + 1}, text  # + the warm-up run
    assert len(report.kills) == kills, text
    assert report.effects > 0, text


def test_drill_single_node(tmp_path: Path) -> None:
    report = asyncio.run(run_drill(runs=20, kills=5, seed=20261122, home=tmp_path / "drill", timeout=240))
    _assert_clean(report, 20, 5)
    assert {k.kind for k in report.kills} <= {"service", "worker"}


def test_drill_with_a_concurrency_limit_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """#16: the drill's stack inherits the limit; its check counts a peak over it as a violation."""
    monkeypatch.setenv("INTERLOCK_GATE_LIMITS", json.dumps({"topics": {"incident.apply": {"concurrency": 1}}}))
    report = asyncio.run(run_drill(runs=20, kills=5, seed=7, home=tmp_path / "drill", timeout=240))
    _assert_clean(report, 20, 5)
    assert "limit: topic incident.apply had at most 1 job(s) in flight (limit 1)" in report.notes, report.render()


def test_drill_cluster_kills_the_events_leader(tmp_path: Path) -> None:
    report = asyncio.run(run_drill(runs=10, kills=3, cluster=True, seed=7, home=tmp_path / "drill", timeout=240))
    _assert_clean(report, 10, 3)
    leader_kills = [k for k in report.kills if k.kind == "nats" and "IL_EVENTS leader" in k.note]
    assert leader_kills, report.render()


# -- a stream-leader kill in the middle of a workload, on R3 streams ---------------------------
JOB = "topic: e2e.step, retries: {max_attempts: 6, backoff_ms: 100}, heartbeat_timeout_ms: 1500, timeout_ms: 20000"
WORKFLOW = f"""
id: e2e-cluster
version: 1
steps:
  a: {{{JOB}, input: {{n: 0}}}}
  b: {{{JOB}, depends_on: [a], input: {{n: "{{{{ steps.a.output.n }}}}"}}}}
  c: {{{JOB}, depends_on: [a], input: {{n: "{{{{ steps.a.output.n }}}}"}}}}
  d: {{{JOB}, depends_on: [b, c], input: {{n: "{{{{ steps.b.output.n + steps.c.output.n }}}}"}}}}
"""
RUNS = 12


def test_events_stream_leader_killed_mid_workload(tmp_path: Path) -> None:
    effects_file = tmp_path / "effects.jsonl"
    stack = Stack(home=tmp_path / "home", cluster=3, workers=[f"{HERE / 'agents.py'}:worker"] * 2,
                  env={"INTERLOCK_SIDE_EFFECTS": str(effects_file), "E2E_STEP_SECONDS": "0.2",
                       "INTERLOCK_AUDITOR_DB": str(tmp_path / "auditor.sqlite3")})
    stack.start_nats()
    try:
        asyncio.run(stack.provision())
        stack.start()
        asyncio.run(_leader_kill_scenario(stack))
    finally:
        stack.stop()
    effects = Counter(json.loads(line)["key"] for line in effects_file.read_text().splitlines())
    # every job did its effect; one repeated after a lease lost in the election may do it again
    assert len(effects) == RUNS * 4, effects


async def _leader_kill_scenario(stack: Stack) -> None:
    cluster = stack.local_cluster
    assert cluster is not None
    client = await Client.connect(stack.url, tenant="default", name="e2e", patient=True, creds=stack.admin_creds)
    nc, js = client.nc, client.js
    try:
        info = await js.stream_info(s.EVENTS_STREAM)
        assert info.config.num_replicas == 3 and info.cluster is not None
        await client.apply_workflow(WORKFLOW)
        run_ids = []
        for i in range(RUNS):
            run_ids.append(await client.start_run("e2e-cluster", {}, key=f"leader-{i}-{uuid.uuid4().hex}"))
            await asyncio.sleep(0.15)
        # mid-workload: some runs have moved, not all have ended
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            logs = [await client.events(r) for r in run_ids]
            if sum(1 for events in logs if any(e["type"] == ev.StepSucceeded.type_name for e in events)) >= 2:
                break
            await asyncio.sleep(0.1)
        ended_before = sum(1 for events in logs if any(e["type"] in TERMINAL for e in events))
        assert ended_before < RUNS, "the workload ended before the kill"
        leader = await cluster.stream_leader(s.EVENTS_STREAM, nc)
        stack.kill(leader)
        killed_at = time.monotonic()
        new_leader = await cluster.stream_leader(s.EVENTS_STREAM, nc, timeout=30)
        elected_after = time.monotonic() - killed_at
        assert new_leader != leader
        await asyncio.sleep(1.0)
        await asyncio.to_thread(stack.restart, leader)
        await cluster.wait_healthy(nc=nc, timeout=60)
        print(f"killed IL_EVENTS leader {leader} with {RUNS - ended_before} runs in flight; "
              f"{new_leader} elected after {elected_after:.1f}s")

        deadline = time.monotonic() + 90
        pending = set(run_ids)
        while pending and time.monotonic() < deadline:
            for run_id in list(pending):
                if any(e["type"] in TERMINAL for e in await client.events(run_id)):
                    pending.discard(run_id)
            await asyncio.sleep(0.2)
        assert not pending, f"runs did not finish after the leader kill: {sorted(pending)}"

        for run_id in run_ids:
            events = await client.events(run_id)
            types = [e["type"] for e in events]
            assert types[0] == ev.RunStarted.type_name and types[-1] == ev.RunSucceeded.type_name, (run_id, types)
            assert sum(t in TERMINAL for t in types) == 1, types
            outcomes = Counter((e["step_id"], e["data"]["attempt"]) for e in events
                               if e["type"] in ev.kinds(ev.StepSucceeded, ev.StepFailed))
            assert set(outcomes.values()) == {1}, f"an outcome was recorded twice in {run_id}: {outcomes}"
            succeeded = sorted(e["step_id"] for e in events if e["type"] == ev.StepSucceeded.type_name)
            assert succeeded == ["a", "b", "c", "d"], succeeded
            report = await client.verify(run_id)
            assert report.ok, report.problems
        # the restarted node holds every event too: all replicas current, one sequence
        info = await js.stream_info(s.EVENTS_STREAM)
        assert info.cluster is not None and all(r.current and not r.offline for r in info.cluster.replicas or [])
    finally:
        await client.close()
