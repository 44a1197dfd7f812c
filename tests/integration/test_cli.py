"""The command line against a real nats-server and the services (the auditor included).

Commands run through Typer's CliRunner in a worker thread (each command runs its own event loop,
as in a real process, while the services keep running on the test's loop); one test runs the
installed ``interlock`` entry point as a separate process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from interlock.auditor.service import AuditorService
from interlock.cli import app
from interlock.client import Client
from interlock.contracts import events as ev
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RUN_LINE = re.compile(r"^run (\S+) \(workflow ")


@pytest.fixture
async def stack(harness: Harness, tmp_path: Path) -> AsyncIterator[tuple[Harness, str]]:
    """The services, an auditor of its own, and a worker echoing its input on a fresh topic."""
    auditor = AuditorService(harness.service_settings("auditor"),
                             db_path=tmp_path / "auditor.sqlite3", instance=unique("cli"))
    await auditor.start()
    topic = f"cli.{unique('echo').replace('-', '_')}"
    worker = Worker(unique("cli-w"))

    @worker.job(topic)
    async def echo(ctx: JobContext) -> dict[str, Any]:
        return {"echo": ctx.input}

    await harness.start_worker(worker)
    try:
        yield harness, topic
    finally:
        await auditor.stop()


def creds_env(harness: Harness, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` with INTERLOCK_CREDS: the admin's, or with INTERLOCK_PRINCIPAL a credential named so
    (the server accepts a credential's commands only under its own name)."""
    assert harness.principals is not None
    env = dict(env or {})
    principal = env.get("INTERLOCK_PRINCIPAL")
    creds = (harness.principals.person("admin", harness.tenant, name=principal) if principal
             else harness.principals.admin(harness.tenant))
    return {"INTERLOCK_CREDS": str(creds), **env}


async def cli(harness: Harness, *args: str, env: dict[str, str] | None = None) -> Result:
    """``interlock --nats URL ARGS…`` in a thread, so its own asyncio.run does not nest in the test's loop."""
    return await asyncio.to_thread(CliRunner().invoke, app, ["--nats", harness.url, *args],
                                   env=creds_env(harness, env))


def workflow_file(tmp_path: Path, wf: str, topic: str, *, gated: bool = False) -> Path:
    steps = f"""
  hello: {{topic: {topic}, input: {{name: "{{{{ input.name }}}}"}}}}
  bye: {{topic: {topic}, depends_on: [{"gate" if gated else "hello"}], input: {{n: 1}}}}
"""
    if gated:
        steps += "  gate: {type: approval, depends_on: [hello], approvers: sre-oncall, prompt: \"go?\"}\n"
    path = tmp_path / f"{wf}.yaml"
    path.write_text(f"id: {wf}\nversion: 1\nsteps:{steps}")
    return path


def run_id_of(result: Result) -> str:
    match = RUN_LINE.match(result.stdout)
    assert match, result.output
    return match.group(1)


async def projected(harness: Harness, run_id: str) -> dict[str, Any]:
    async with await Client.connect(harness.url, creds=creds_env(harness)["INTERLOCK_CREDS"]) as client:
        return await client.wait_projected(run_id, timeout=20)


async def test_apply_start_wait_then_query_in_every_format(stack: tuple[Harness, str], tmp_path: Path) -> None:
    harness, topic = stack
    wf = unique("cli-wf")
    path = workflow_file(tmp_path, wf, topic)

    applied = await cli(harness, "workflow", "apply", str(path))
    assert applied.exit_code == 0, applied.output
    assert applied.stdout.startswith(f"workflow {wf} v1 registered (hash ")
    again = await cli(harness, "workflows", "apply", str(path))  # today's spelling
    assert f"workflow {wf} v1 unchanged" in again.stdout
    listed = json.loads((await cli(harness, "workflow", "list", "-o", "json")).stdout)
    assert {"workflow": wf, "version": "1"} in listed

    started = await cli(harness, "run", "start", wf, "--input", '{"name": "ada"}', "--wait", "--timeout", "60")
    assert started.exit_code == 0, started.output
    run_id = run_id_of(started)
    assert "hello#1" in started.stdout and "bye#1" in started.stdout  # live progress, one line per event
    await projected(harness, run_id)

    runs = json.loads((await cli(harness, "run", "list", "--workflow", wf, "-o", "json")).stdout)
    assert [(r["run_id"], r["status"]) for r in runs] == [(run_id, "succeeded")]
    jsonl = (await cli(harness, "runs", "--workflow", wf, "--status", "succeeded", "-o", "jsonl")).stdout
    assert [json.loads(line)["run_id"] for line in jsonl.splitlines()] == [run_id]
    none = await cli(harness, "runs", "--workflow", wf, "--status", "failed")
    assert none.stdout == "(none)\n"

    described = json.loads((await cli(harness, "run", "describe", run_id, "-o", "json")).stdout)
    assert described["status"] == "succeeded"
    assert {s["step_id"]: s["status"] for s in described["steps"]} == {"hello": "succeeded", "bye": "succeeded"}
    status = await cli(harness, "status", run_id)  # today's spelling, table
    assert status.stdout.splitlines()[0] == f"run {run_id}  {wf} v1  succeeded"
    assert "allow" in status.stdout and "{'decision'" not in status.stdout

    timeline = json.loads((await cli(harness, "run", "timeline", run_id, "-o", "json")).stdout)
    assert timeline[0]["type"] == ev.RunStarted.type_name and timeline[-1]["type"] == ev.RunSucceeded.type_name
    lines = (await cli(harness, "timeline", run_id)).stdout.splitlines()
    assert len(lines) == len(timeline)

    verified = await cli(harness, "audit", "verify", run_id)
    assert verified.exit_code == 0 and "chain intact" in verified.stdout
    report = json.loads((await cli(harness, "audit", "verify", run_id, "-o", "json")).stdout)
    assert report["ok"] is True and report["events"] == len(timeline)

    plan = await cli(harness, "rerun", run_id, "--from-step", "bye", "--dry-run")
    assert plan.exit_code == 0, plan.output
    assert plan.stdout.splitlines()[1:] == [f"  {'hello':<24} reuse output", f"  {'bye':<24} run again",
                                            "(dry run: nothing started)"]


async def test_policy_reads_and_projection_rebuild(stack: tuple[Harness, str], tmp_path: Path) -> None:
    """Read-only policy commands (a publish would change the session's policy for other tests) and a
    rebuild into a file of its own."""
    harness, topic = stack
    wf = unique("cli-policy")
    assert (await cli(harness, "workflow", "apply", str(workflow_file(tmp_path, wf, topic)))).exit_code == 0
    active = json.loads((await cli(harness, "policy", "show", "-o", "json")).stdout)
    shown = await cli(harness, "policy", "show")
    assert shown.stdout.startswith(f"# snapshot {active['snapshot_id']}") and active["source"] in shown.stdout

    decided = json.loads((await cli(harness, "policy", "explain", wf, "hello", "--input", '{"name": "a"}',
                                    "-o", "json")).stdout)
    assert decided["snapshot_id"] == active["snapshot_id"] and decided["explain"]
    evaluated = await cli(harness, "policy", "eval", wf, "hello")
    assert evaluated.exit_code == 0
    assert evaluated.stdout.startswith(f"{decided['decision']} under ")
    no_step = await cli(harness, "policy", "eval", wf, "nowhere")
    assert no_step.exit_code == 1 and "no step 'nowhere'" in no_step.stderr

    db = tmp_path / "rebuilt.sqlite3"
    rebuilt = await cli(harness, "audit", "rebuild", "--db", str(db))
    assert rebuilt.exit_code == 0, rebuilt.output
    assert rebuilt.stdout.splitlines()[-1].startswith(f"projection {db} rebuilt: ")
    assert db.stat().st_size > 0


async def test_todays_run_spelling_then_approve_by_job_hash_and_cancel(stack: tuple[Harness, str],
                                                                      tmp_path: Path) -> None:
    harness, topic = stack
    wf = unique("cli-gated")
    assert (await cli(harness, "workflow", "apply", str(workflow_file(tmp_path, wf, topic, gated=True)))).exit_code == 0
    approver = unique("cli-approver")
    granted = await cli(harness, "approver", "grant", approver, "sre-oncall")
    assert granted.stdout == f"{approver} holds sre-oncall\n"
    try:
        first = run_id_of(await cli(harness, "run", wf, "--input", '{"name": "x"}'))  # `run WORKFLOW`, no --wait
        second = run_id_of(await cli(harness, "run", wf, "--input", '{"name": "y"}', "--idempotency-key",
                                     unique("k")))
        for run_id in (first, second):
            await harness.wait_for(run_id, lambda evs: ev.ApprovalRequested.type_name in types(evs))
        job_hash = (await harness.run_state(first)).steps["gate"].approval.job_hash  # type: ignore[union-attr]

        async with await Client.connect(harness.url, creds=creds_env(harness)["INTERLOCK_CREDS"]) as client:
            for _ in range(200):  # the auditor projects asynchronously
                pending = {(a["run_id"], a["step_id"]) for a in await client.approvals()}
                if {(first, "gate"), (second, "gate")} <= pending:
                    break
                await asyncio.sleep(0.05)
        rows = json.loads((await cli(harness, "approval", "list", "-o", "json")).stdout)
        assert {r["job_hash"] for r in rows if r["run_id"] == first} == {job_hash}
        table = (await cli(harness, "approvals")).stdout
        assert f"{job_hash[:12]}…" in table and job_hash not in table

        # the approver is the principal the CLI connects as (here INTERLOCK_PRINCIPAL); a --by naming
        # someone else is refused before anything is sent
        as_approver = {"INTERLOCK_PRINCIPAL": approver}
        posing = await cli(harness, "approve", first, "gate", "--by", "someone-else", env=as_approver)
        assert posing.exit_code == 1 and posing.stderr.startswith(
            f"interlock: --by someone-else is not the principal you are connected as ({approver})")
        stranger = await cli(harness, "approve", first, "gate", env={"INTERLOCK_PRINCIPAL": unique("stranger")})
        assert stranger.exit_code == 1 and "lacks role 'sre-oncall' (is not a registered approver)" in stranger.stderr
        approved = await cli(harness, "approve", first, "gate", "--by", approver, "--reason", "looks good",
                             env=as_approver)
        assert approved.exit_code == 0, approved.output
        assert approved.stdout.splitlines()[0] == f"approval request: run {first} step gate"
        assert f"job hash {job_hash}" in approved.stdout
        assert approved.stdout.splitlines()[-1] == f"approved by {approver}"
        events = await harness.wait_end(first)
        assert types(events)[-1] == ev.RunSucceeded.type_name
        [grant] = [e["data"] for e in events if e["type"] == ev.ApprovalGranted.type_name]
        assert (grant["approver"], grant["job_hash"], grant["reason"]) == (approver, job_hash, "looks good")

        not_pending = await cli(harness, "approval", "approve", first, "gate", env=as_approver)
        assert not_pending.exit_code == 1
        assert not_pending.stderr.startswith("interlock: ") and len(not_pending.stderr.splitlines()) == 1

        cancelled = await cli(harness, "run", "cancel", second, "--reason", "not needed")
        assert cancelled.exit_code == 0 and cancelled.stdout == f"run {second} cancelled\n"
        assert types(await harness.wait_end(second))[-1] == ev.RunCancelled.type_name
    finally:
        revoked = await cli(harness, "approvers", "revoke", approver)  # today's spelling; leaves the directory empty
        assert revoked.stdout == f"{approver} holds no role\n"


async def test_errors_are_one_line_on_stderr(stack: tuple[Harness, str]) -> None:
    harness, _ = stack
    unknown_run = await cli(harness, "run", "describe", "00000000-0000-5000-8000-000000000000")
    unknown_workflow = await cli(harness, "run", "start", unique("no-such-workflow"))
    unreachable = await asyncio.to_thread(CliRunner().invoke, app, ["run", "list", "--nats", "nats://127.0.0.1:1"])
    for result in (unknown_run, unknown_workflow, unreachable):
        assert result.exit_code == 1, result.output
        assert result.stdout == ""
        assert result.stderr.startswith("interlock: ") and len(result.stderr.splitlines()) == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in unreachable.stderr


async def test_the_installed_entry_point(stack: tuple[Harness, str], tmp_path: Path) -> None:
    harness, topic = stack
    wf = unique("cli-entry")
    script = Path(sys.executable).with_name("interlock")
    assert script.exists(), f"{script}: the entry point is not installed (pip install -e .)"

    async def interlock(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(script, *args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE,
                                                    env={**os.environ, **creds_env(harness)})
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await interlock("workflow", "apply", str(workflow_file(tmp_path, wf, topic)), "--nats",
                                     harness.url)
    assert code == 0, err
    code, out, err = await interlock("--nats", harness.url, "run", wf, "--input", '{"name": "z"}', "--wait",
                                     "--timeout", "60")
    assert code == 0, err
    match = RUN_LINE.match(out)
    assert match, out
    await projected(harness, match.group(1))
    code, out, err = await interlock("--nats", harness.url, "run", "list", "--workflow", wf, "-o", "json")
    assert code == 0, err
    assert [r["run_id"] for r in json.loads(out)] == [match.group(1)]
    code, out, err = await interlock("--nats", harness.url, "runs", "--status", "bogus")
    assert code == 2 and "timed_out" in err


async def test_agents_rollout_status_abort_clear_and_breakers(stack: tuple[Harness, str]) -> None:
    harness, _ = stack
    topic = f"cli.{unique('canary').replace('-', '_')}"
    for version in ("1", "2"):
        worker = Worker(unique(f"cli-v{version}"))

        @worker.job(topic, version=version)
        async def echo(ctx: JobContext) -> dict[str, Any]:
            return {}

        await harness.start_worker(worker)
    listed = await cli(harness, "agents", "--output", "json")  # `interlock agents` still lists
    assert listed.exit_code == 0, listed.output
    assert {a["version"] for a in json.loads(listed.stdout) if a["topic"] == topic} == {"1", "2"}
    bad = await cli(harness, "agents", "rollout", topic, "--to", "2", "--canary", "150%")
    assert bad.exit_code != 0 and "at most 100%" in bad.stderr
    started = await cli(harness, "agents", "rollout", topic, "--to", "2", "--canary", "10%", "--window", "10m")
    assert started.exit_code == 0, started.output
    assert started.stdout.strip() == f"rollout of {topic}: started (stable 1, canary 2 at 10%; status active)"
    again = await cli(harness, "agents", "rollout", topic, "--to", "2")
    assert again.exit_code == 1 and "already has an active rollout" in again.stderr
    status = await cli(harness, "agents", "rollout-status", topic, "--output", "json")
    [row] = json.loads(status.stdout)
    assert (row["status"], row["stable"], row["canary"], row["share"], row["window_s"]) == ("active", "1", "2", 0.1,
                                                                                          600.0)
    early = await cli(harness, "agents", "rollout-clear", topic)
    assert early.exit_code == 1 and "still active" in early.stderr
    aborted = await cli(harness, "agents", "rollout-abort", topic, "--reason", "cli test")
    assert aborted.exit_code == 0 and "aborted" in aborted.stdout
    cleared = await cli(harness, "agents", "rollout-clear", topic)
    assert cleared.exit_code == 0, cleared.output
    assert json.loads((await cli(harness, "agents", "rollout-status", topic, "--output", "json")).stdout) == []
    breakers = await cli(harness, "breakers", topic, "--output", "json")
    assert breakers.exit_code == 0 and json.loads(breakers.stdout) == []
