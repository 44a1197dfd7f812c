"""The command line without NATS: parsing, today's spellings, -o formats, validation errors, --version.

Commands run through Typer's CliRunner against a fake client that records every call, so each test
shows what a command line turns into and what it prints.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner, Result

import interlock.cli
from interlock.cli import _common, _ops, app, main
from interlock.cli._output import short_hash
from interlock.client import NotFound, PendingApproval, PolicyChange, PolicyDecision, PolicySimulation
from interlock.contracts.messages import AgentRegistration, ScheduleRow
from interlock.core.run import RunStatus
from interlock.devstack.stack import API, SERVICES

RUN = "6f1c2a3b-0000-5000-8000-000000000001"
NOW = datetime(2026, 12, 2, tzinfo=UTC)
JOB_HASH = "3f2a9c0d1e2b" + "a" * 52
STATUSES = typing.get_args(RunStatus)


class FakeClient:
    """Stands in for interlock.client.Client: every awaited method is recorded and answers from
    ``answers`` (a callable is called with the arguments; an exception is raised)."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.connected: dict[str, Any] = {}
        self.tenant = "default"
        self.principal = "bob"  # who the client's commands are from
        self.url, self.url_source = "nats://127.0.0.1:4222", "--nats"

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def method(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            answer = self.answers.get(name)
            if isinstance(answer, Exception):
                raise answer
            result = answer(*args, **kwargs) if callable(answer) else answer
            return await result if inspect.isawaitable(result) else result

        return method

    def called(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(args, kwargs) for n, args, kwargs in self.calls if n == name]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()

    async def connect(url: str | None = None, *, creds: Path | None = None, tenant: str | None = None,
                      **_: Any) -> FakeClient:
        client.connected = {"url": url, "creds": creds, "tenant": tenant}
        return client

    monkeypatch.setattr(_common, "Client", types.SimpleNamespace(connect=connect))
    return client


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def run_rows() -> list[dict[str, Any]]:
    return [{"run_id": RUN, "workflow_id": "incident-remediation", "workflow_version": "1", "status": "succeeded",
             "started_at": "2026-12-01T22:00:00.000+00:00", "ended_at": "2026-12-01T22:00:01.000+00:00"},
            {"run_id": "r2", "workflow_id": "other", "workflow_version": "3", "status": "failed",
             "started_at": "2026-12-01T21:00:00.000+00:00", "ended_at": None}]


# -- surface ------------------------------------------------------------------------------------
def test_public_surface_is_app_and_main() -> None:
    assert interlock.cli.__all__ == ["app", "main"]


def test_version_prints_the_installed_version() -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"interlock {version('interlock')}"
    assert main(["--version"]) == 0


def _group() -> Any:
    return typer.main.get_command(app)


def test_help_shows_the_noun_groups_and_hides_todays_spellings() -> None:
    commands = _group().commands
    visible = {name for name, cmd in commands.items() if not cmd.hidden}
    hidden = {name for name, cmd in commands.items() if cmd.hidden}
    assert visible == {"run", "approval", "workflow", "policy", "approver", "agent", "dlq", "breakers", "audit",
                       "creds", "tenant", "cost", "alerts", "schedules", "apikeys", "up", "serve", "worker", "nats",
                       "demo", "drill", "provision", "step", "feedback"}
    assert hidden == {"runs", "status", "timeline", "cancel", "rerun", "approvals", "approve", "reject",
                      "validate", "agents", "workflows", "approvers"}
    assert set(commands["run"].commands) == {"start", "list", "describe", "timeline", "cancel", "rerun", "diff",
                                             "failures", "resume", "pause", "unpause"}
    assert set(commands["step"].commands) == {"retry", "skip"}
    assert set(commands["feedback"].commands) == {"give", "list", "export"}
    assert set(commands["approval"].commands) == {"list", "approve", "reject"}
    assert set(commands["workflow"].commands) == {"apply", "list", "validate"}
    assert set(commands["policy"].commands) == {"publish", "rollback", "show", "history", "eval", "explain",
                                                "simulate"}
    assert set(commands["approver"].commands) == {"grant", "revoke", "list"}
    assert set(commands["apikeys"].commands) == {"create", "list", "revoke"}
    assert set(commands["agent"].commands) == {"list", "rollout", "rollout-status", "rollout-abort", "rollout-clear"}
    assert set(commands["agents"].commands) == set(commands["agent"].commands)
    assert set(commands["breakers"].commands) == {"list", "log"}
    listed = set(re.findall(r"^│ ([a-z]\S*) ", cli("--help").stdout, re.MULTILINE))
    assert listed == visible


def _walk(cmd: Any, path: str = "interlock") -> list[tuple[str, Any]]:
    found = [(path, cmd)]
    for name, sub in getattr(cmd, "commands", {}).items():
        found += _walk(sub, f"{path} {name}")
    return found


def test_every_command_argument_and_option_has_help() -> None:
    missing = []
    for path, cmd in _walk(_group()):
        if not (cmd.help or "").strip():
            missing.append(path)
        for param in cmd.params:
            if param.name not in ("help",) and not (getattr(param, "help", None) or "").strip():
                missing.append(f"{path} {param.name}")
    assert missing == []


LIST_OR_DESCRIBE = {"list", "describe", "timeline", "history", "show", "eval", "explain", "simulate", "verify",
                    "runs", "status", "approvals", "agents", "log", "rollout-status"}


def test_list_and_describe_commands_take_output() -> None:
    commands = [(path, cmd) for path, cmd in _walk(_group())
                if path.split()[-1] in LIST_OR_DESCRIBE and not getattr(cmd, "commands", None)]
    assert len(commands) >= 20
    assert [path for path, cmd in commands if "output" not in {p.name for p in cmd.params}] == []


def test_shell_completion_script() -> None:
    result = cli("--show-completion", "bash")
    assert result.exit_code == 0
    assert "_INTERLOCK_COMPLETE" in result.stdout


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", [["run", "list"], ["runs"]])
def test_an_unknown_status_is_a_usage_error_listing_the_valid_ones(fake: FakeClient, spelling: list[str]) -> None:
    result = cli(*spelling, "--status", "bogus")
    assert result.exit_code == 2
    assert "bogus" in result.stderr
    for status in STATUSES:
        assert status in result.stderr
    assert fake.calls == []
    assert main([*spelling, "--status", "bogus"]) == 2


def test_the_status_choices_are_the_run_aggregates() -> None:
    assert set(STATUSES) == {"running", "compensating", "succeeded", "failed", "denied", "cancelled", "timed_out"}


def test_an_unknown_output_format_is_a_usage_error(fake: FakeClient) -> None:
    result = cli("run", "list", "-o", "yaml")
    assert result.exit_code == 2
    assert "table" in result.stderr and "jsonl" in result.stderr


def test_an_unknown_service_is_a_usage_error_listing_them() -> None:
    result = cli("serve", "planer")
    assert result.exit_code == 2
    for name in SERVICES:
        assert name in result.stderr


def test_serve_knows_every_service_the_stack_runs() -> None:
    assert tuple(_ops.SERVICE_CLASSES) == (*SERVICES, API) == typing.get_args(_ops.ServiceName)


def test_bad_input_json_names_the_option(fake: FakeClient) -> None:
    result = cli("run", "start", "wf", "--input", "{nope")
    assert result.exit_code == 1
    assert result.stderr.startswith("interlock: --input: not valid JSON")
    assert fake.calls == []


def test_a_missing_input_file_is_one_line(fake: FakeClient, tmp_path: Path) -> None:
    result = cli("run", "start", "wf", "--input", f"@{tmp_path / 'none.json'}")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"interlock: {tmp_path / 'none.json'}: no such file"


def test_reject_needs_a_reason(fake: FakeClient) -> None:
    for spelling in (["approval", "reject"], ["reject"]):
        result = cli(*spelling, RUN, "approval_gate")
        assert result.exit_code == 2
        assert "--reason" in result.stderr
    assert fake.calls == []


def test_client_errors_are_one_line_with_exit_1(fake: FakeClient) -> None:
    fake.answers["status"] = NotFound(f"run {RUN} not found")
    result = cli("run", "describe", RUN)
    assert result.exit_code == 1
    assert result.stderr == f"interlock: run {RUN} not found\n"
    assert result.stdout == ""


# -- runs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", [["run", "start"], ["run"]])
def test_start_and_todays_run_workflow(fake: FakeClient, spelling: list[str], tmp_path: Path) -> None:
    fake.answers["start_run"] = RUN
    (tmp_path / "in.json").write_text('{"alert": {"id": "INC-1"}}')
    result = cli(*spelling, "incident-remediation", "--input", f"@{tmp_path / 'in.json'}", "--idempotency-key", "k1",
                 "--version", "2")
    assert result.exit_code == 0, result.output
    [(args, kwargs)] = fake.called("start_run")
    assert args == ("incident-remediation", {"alert": {"id": "INC-1"}})
    assert kwargs["key"] == "k1" and kwargs["version"] == "2"
    assert result.stdout == f"run {RUN} (workflow incident-remediation, idempotency key k1)\n"
    assert fake.called("wait") == []


def test_start_with_a_priority_and_a_bad_one(fake: FakeClient) -> None:
    fake.answers["start_run"] = RUN
    assert cli("run", "start", "wf", "--priority", "5").exit_code == 0
    [(_, kwargs)] = fake.called("start_run")
    assert kwargs["priority"] == 5
    result = cli("run", "start", "wf", "--priority", "9")
    assert result.exit_code == 2 and "--priority" in result.stderr
    assert len(fake.called("start_run")) == 1


def test_agents_show_each_topics_queue_depth(fake: FakeClient) -> None:
    fake.answers["agents"] = [AgentRegistration(worker_id="w1", topic="llm", started_at=NOW, last_heartbeat=NOW)]
    fake.answers["queue_depth"] = {"llm": 3, "nobody.serves": 7}
    result = cli("agents", "--output", "json")
    assert result.exit_code == 0, result.output
    rows = {(r["topic"], r["worker_id"]): r["queued"] for r in json.loads(result.stdout)}
    assert rows == {("llm", "w1"): 3, ("nobody.serves", "(none)"): 7}


def test_start_wait_prints_progress_and_exits_by_the_outcome(fake: FakeClient) -> None:
    fake.answers["start_run"] = RUN

    async def wait(run_id: str, *, timeout: float | None = None, on_event: Any = None) -> str:
        assert (run_id, timeout) == (RUN, 5.0)
        on_event({"type": "RunFailed", "service": "planner", "step_id": "apply_patch", "attempt": 2,
                  "data": {"reason": "boom"}})
        return "RunFailed"

    fake.answers["wait"] = wait
    result = cli("run", "wf", "--wait", "--timeout", "5")
    assert result.exit_code == 1
    progress = result.stdout.splitlines()[1]
    assert progress.startswith("  +") and "planner    apply_patch#2" in progress
    fake.answers["wait"] = "RunSucceeded"
    assert cli("run", "wf", "--wait").exit_code == 0


def test_global_options_before_or_after_the_command(fake: FakeClient) -> None:
    fake.answers["runs"] = []
    cli("--nats", "nats://h:1", "--tenant", "acme", "--creds", "u.creds", "run", "list")
    first = dict(fake.connected)
    cli("runs", "--nats", "nats://h:1", "--tenant", "acme", "--creds", "u.creds")
    assert fake.connected == first == {"url": "nats://h:1", "creds": Path("u.creds"), "tenant": "acme"}
    cli("run", "--tenant", "acme", "wf")  # today's `run --tenant T WORKFLOW`
    assert fake.connected["tenant"] == "acme"
    assert fake.called("start_run")[-1][0][0] == "wf"


@pytest.mark.parametrize("spelling", [["run", "list"], ["runs"]])
def test_run_list_in_each_format(fake: FakeClient, spelling: list[str]) -> None:
    fake.answers["runs"] = run_rows()
    as_json = cli(*spelling, "-o", "json", "--status", "succeeded", "--workflow", "incident-remediation",
                  "--limit", "7")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == run_rows()
    assert fake.called("runs")[-1][1] == {"status": "succeeded", "workflow_id": "incident-remediation", "limit": 7}
    as_jsonl = cli(*spelling, "--output", "jsonl")
    assert [json.loads(line) for line in as_jsonl.stdout.splitlines()] == run_rows()
    as_table = cli(*spelling)
    header, *rows = [line for line in as_table.stdout.splitlines() if line.strip() and "─" not in line]
    assert header.split() == ["RUN_ID", "WORKFLOW_ID", "VERSION", "STATUS", "STARTED_AT", "ENDED_AT"]
    assert rows[0].split()[:4] == [RUN, "incident-remediation", "1", "succeeded"]


def test_an_empty_table_says_none(fake: FakeClient) -> None:
    fake.answers["runs"] = []
    assert cli("runs").stdout == "(none)\n"
    assert json.loads(cli("runs", "-o", "json").stdout) == []


def status_doc() -> dict[str, Any]:
    """What the auditor answers: the run's fields at the top level, and its steps."""
    return {"run_id": RUN, "workflow_id": "wf", "workflow_version": "1", "status": "failed",
            "reason": "apply_patch failed",
            "steps": [{"step_id": "apply_patch", "status": "failed", "attempt": 2, "approval_status": "approved",
                       "decision": {"decision": "require_approval", "snapshot_id": "1@" + "b" * 64,
                                    "rule_ids": ["patches-need-oncall", "default"]},
                       "error": "[Errno 5] boom"}]}


@pytest.mark.parametrize("spelling", [["run", "describe"], ["status"]])
def test_describe_prints_decisions_readably(fake: FakeClient, spelling: list[str]) -> None:
    fake.answers["status"] = status_doc()
    result = cli(*spelling, RUN)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"run {RUN}  wf v1  failed — apply_patch failed"
    assert "require_approval (rules patches-need-oncall, default)" in result.stdout
    assert "[Errno 5] boom" in result.stdout  # cell text is not read as Rich markup
    assert "{'decision'" not in result.stdout


def test_describe_as_json_and_todays_status_json(fake: FakeClient) -> None:
    fake.answers["status"] = status_doc()
    assert json.loads(cli("run", "describe", RUN, "-o", "json").stdout) == status_doc()
    assert json.loads(cli("status", RUN, "--json").stdout) == status_doc()
    [line] = cli("run", "describe", RUN, "-o", "jsonl").stdout.splitlines()
    assert json.loads(line) == status_doc()


@pytest.mark.parametrize("spelling", [["run", "timeline"], ["timeline"]])
def test_timeline_lines_and_json(fake: FakeClient, spelling: list[str]) -> None:
    rows = [{"seq": 1, "at": "2026-12-01T22:00:00.123456+00:00", "service": "planner", "step_id": None,
             "attempt": None, "type": "RunStarted", "summary": "run started"},
            {"seq": 2, "at": "2026-12-01T22:00:00.200000+00:00", "service": "dispatcher", "step_id": "detect",
             "attempt": 1, "type": "StepDispatched", "summary": "dispatched"}]
    fake.answers["timeline"] = rows
    lines = cli(*spelling, RUN).stdout.splitlines()
    assert lines[0].split() == ["1", "22:00:00.123", "planner", "run", "started"]
    assert lines[1].split() == ["2", "22:00:00.200", "dispatcher", "detect#1", "dispatched"]
    assert json.loads(cli(*spelling, RUN, "-o", "json").stdout) == rows


@pytest.mark.parametrize("spelling", [["run", "cancel"], ["cancel"]])
def test_cancel(fake: FakeClient, spelling: list[str]) -> None:
    result = cli(*spelling, RUN, "--reason", "wrong host")
    assert result.exit_code == 0
    assert result.stdout == f"run {RUN} cancelled\n"
    [(args, kwargs)] = fake.called("cancel")
    assert args == (RUN,) and kwargs["reason"] == "wrong host"


@pytest.mark.parametrize("spelling", [["run", "rerun"], ["rerun"]])
def test_rerun_prints_the_plan(fake: FakeClient, spelling: list[str]) -> None:
    fake.answers["rerun_plan"] = types.SimpleNamespace(steps=lambda: [("detect", False), ("apply_patch", True)])
    fake.answers["rerun"] = "r-new"
    dry = cli(*spelling, RUN, "--from-step", "apply_patch", "--dry-run")
    assert dry.exit_code == 0
    assert dry.stdout.splitlines() == [f"re-run of {RUN} from step apply_patch:",
                                       f"  {'detect':<24} reuse output", f"  {'apply_patch':<24} run again",
                                       "(dry run: nothing started)"]
    assert fake.called("rerun") == []
    started = cli(*spelling, RUN, "--from-step", "apply_patch")
    assert started.stdout.splitlines()[-1] == f"run r-new started (re-run of {RUN})"
    assert fake.called("rerun_plan")[-1][0] == (RUN, "apply_patch")


def test_rerun_needs_from_step(fake: FakeClient) -> None:
    result = cli("run", "rerun", RUN)
    assert result.exit_code == 2
    assert "--from-step" in result.stderr


# -- approvals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", [["approval", "approve"], ["approve"]])
def test_approve_prints_the_request_and_sends_its_job_hash(fake: FakeClient, spelling: list[str]) -> None:
    fake.answers["pending_approval"] = PendingApproval(run_id=RUN, step_id="approval_gate", job_hash=JOB_HASH,
                                                       snapshot_id="1@" + "c" * 64, approver_role="sre-oncall",
                                                       input={"plan": "restart"})
    result = cli(*spelling, RUN, "approval_gate", "--reason", "looks good")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"approval request: run {RUN} step approval_gate",
        f"  job hash {JOB_HASH}, policy snapshot 1@{'c' * 64}, role sre-oncall",
        '  job input {"plan": "restart"}',
        "approved by bob"]  # the connected principal
    [(args, kwargs)] = fake.called("approve")
    assert args == (RUN, "approval_gate")
    assert kwargs == {"role": "sre-oncall", "job_hash": JOB_HASH, "reason": "looks good"}
    # the deprecated --by must name the connected principal: anything else is refused, nothing sent
    assert cli(*spelling, RUN, "approval_gate", "--by", "bob").exit_code == 0
    result = cli(*spelling, RUN, "approval_gate", "--by", "mallory")
    assert result.exit_code == 1 and len(fake.called("approve")) == 2
    assert result.stderr == ("interlock: --by mallory is not the principal you are connected as (bob): the approver "
                             "is always the connected principal (set INTERLOCK_PRINCIPAL or use its creds)\n")


def test_reject_sends_the_reason_and_an_explicit_hash(fake: FakeClient) -> None:
    fake.answers["pending_approval"] = PendingApproval(RUN, "gate", JOB_HASH, "1@x", "sre", None)
    result = cli("reject", RUN, "gate", "--reason", "no", "--job-hash", "f" * 64, "--role", "sre-lead")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[-1].startswith("rejected by ")
    [(_, kwargs)] = fake.called("reject")
    assert kwargs["job_hash"] == "f" * 64 and kwargs["role"] == "sre-lead" and kwargs["reason"] == "no"


@pytest.mark.parametrize("spelling", [["approval", "list"], ["approvals"]])
def test_approvals_table_marks_truncated_hashes(fake: FakeClient, spelling: list[str]) -> None:
    rows = [{"run_id": RUN, "step_id": "gate", "approver_role": "sre-oncall", "job_hash": JOB_HASH,
             "requested_at": "2026-12-01T22:00:00", "expires_at": None}]
    fake.answers["approvals"] = rows
    table = cli(*spelling).stdout
    assert "3f2a9c0d1e2b…" in table and JOB_HASH not in table
    assert json.loads(cli(*spelling, "-o", "json").stdout) == rows  # machine output keeps the whole hash


def test_short_hash() -> None:
    assert short_hash(JOB_HASH) == "3f2a9c0d1e2b…"
    assert short_hash("7@" + JOB_HASH) == "7@3f2a9c0d1e2b…"
    assert short_hash("abc") == "abc"
    assert short_hash(None) == ""


@pytest.mark.parametrize("group", ["approver", "approvers"])
def test_approver_directory(fake: FakeClient, group: str) -> None:
    fake.answers["grant_approver"] = {"sre-oncall", "sre-lead"}
    fake.answers["revoke_approver"] = set()
    fake.answers["approvers"] = {"alice": ["sre-lead", "sre-oncall"]}
    assert cli(group, "grant", "alice", "sre-oncall", "sre-lead").stdout == "alice holds sre-lead, sre-oncall\n"
    assert fake.called("grant_approver")[-1][0] == ("alice", ["sre-oncall", "sre-lead"])
    assert cli(group, "revoke", "alice").stdout == "alice holds no role\n"
    assert fake.called("revoke_approver")[-1][0] == ("alice", None)
    assert json.loads(cli(group, "list", "-o", "json").stdout) == [
        {"approver": "alice", "roles": ["sre-lead", "sre-oncall"]}]


# -- workflows -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", [["workflow", "validate"], ["validate"]])
def test_validate_reports_every_problem_with_file_and_line(spelling: list[str], tmp_path: Path,
                                                           examples_dir: Path) -> None:
    good = examples_dir / "incident-remediation" / "workflow.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: wf\nversion: 1\nsteps:\n  a: {topic: x, depends_on: [nowhere]}\n  b: {topic: y, colour: red}\n")
    result = cli(*spelling, str(good), str(bad), str(tmp_path / "missing.yaml"))
    assert result.exit_code == 1
    out = result.stdout
    assert f"{good}: ok — workflow incident-remediation v" in out and "…" in out
    assert f"{bad}:4" in out and f"{bad}:5" in out  # both problems, each with its line
    assert f"{tmp_path / 'missing.yaml'}: no such file" in out
    assert cli(*spelling, str(good)).exit_code == 0


@pytest.mark.parametrize("group", ["workflow", "workflows"])
def test_workflow_list_and_apply(fake: FakeClient, group: str, examples_dir: Path) -> None:
    fake.answers["workflows"] = [("incident-remediation", "1"), ("incident-remediation", "2")]
    assert json.loads(cli(group, "list", "-o", "json").stdout) == [
        {"workflow": "incident-remediation", "version": "1"}, {"workflow": "incident-remediation", "version": "2"}]
    wf = types.SimpleNamespace(id="incident-remediation", version="1", content_hash="e" * 64)
    fake.answers["apply_workflow"] = (wf, True)
    path = str(examples_dir / "incident-remediation" / "workflow.yaml")
    result = cli(group, "apply", path)
    assert result.exit_code == 0
    assert result.stdout.startswith(f"workflow incident-remediation v1 registered (hash {'e' * 12}…); trigger subject ")
    [(args, kwargs)] = fake.called("apply_workflow")
    assert args[0] == Path(path).read_text() and kwargs == {"filename": path, "files": {}}


def test_workflow_apply_sends_the_guard_rule_files_it_names(fake: FakeClient, tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "deny.yaml").write_text("words: [bluebird]\n")
    path = tmp_path / "wf.yaml"
    path.write_text("id: g\nversion: 1\nsteps:\n  a: {topic: t, guard: {content: {deny_file: rules/deny.yaml}}}\n")
    fake.answers["apply_workflow"] = (types.SimpleNamespace(id="g", version="1", content_hash="e" * 64), True)
    assert cli("workflow", "apply", str(path)).exit_code == 0
    [(_, kwargs)] = fake.called("apply_workflow")
    assert kwargs["files"] == {"rules/deny.yaml": "words: [bluebird]\n"}


@pytest.mark.parametrize("command", [["validate"], ["workflow", "apply"]])
def test_bad_workflow_files_get_one_clear_line(fake: FakeClient, command: list[str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"id: wf\nversion: 1\nname: caf\xe9\nsteps: {a: {topic: t}}\n")
    binary = tmp_path / "blob.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"id: wf\nversion: 1\nsteps: {a: {topic: t}}\n" + b"#" * 200)
    monkeypatch.setenv("INTERLOCK_WORKFLOW_MAX_BYTES", "100")
    expected = {latin1: f"{latin1}:3: not UTF-8 text: invalid byte 0xe9 at byte offset 27",
                binary: f"{binary}: not a text file: NUL byte at byte offset 8",
                big: f"{big}: the workflow is {big.stat().st_size} bytes, over the limit of 100 bytes"}
    for path, line in expected.items():
        result = cli(*command, str(path))
        assert result.exit_code == 1, result.output
        assert result.stdout.startswith(line) and result.stdout.count("\n") == 1
    assert fake.called("apply_workflow") == []


# -- policy ----------------------------------------------------------------------------------------
def decision(**extra: Any) -> PolicyDecision:
    return PolicyDecision(decision="require_approval", snapshot_id="4@" + JOB_HASH,
                          rule_ids=["patches-need-oncall"], reason="patches are applied by a person on call",
                          approver_role="sre-oncall", approval_expires_ms=3600000,
                          constraints={"max_cost_usd": "5"}, **extra)


def test_policy_eval_prints_the_decision_readably(fake: FakeClient) -> None:
    fake.answers["policy_decide"] = decision()
    result = cli("policy", "eval", "incident-remediation", "apply_patch", "--input", '{"plan": {}}')
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "require_approval under 4@3f2a9c0d1e2b… (rules patches-need-oncall): patches are applied by a person on call",
        "  approver role sre-oncall, expires in 3600000 ms",
        "  constraints max_cost_usd=5"]
    [(args, kwargs)] = fake.called("policy_decide")
    assert args == ("incident-remediation", "apply_patch", {"plan": {}}) and kwargs["explain"] is False


def test_policy_explain_lists_matches_per_action(fake: FakeClient) -> None:
    from interlock.client import PolicyRuleMatch

    fake.answers["policy_decide"] = decision(explain=[
        PolicyRuleMatch("dispatch", "allow", ["default"]),
        PolicyRuleMatch("dispatch_unattended", "deny", ["patches-need-oncall"], ["bad attr"])])
    result = cli("policy", "explain", "wf", "step")
    assert result.stdout.splitlines()[-2:] == [
        "  dispatch: allow; matched default",
        "  dispatch_unattended: deny; matched patches-need-oncall; errors bad attr"]
    assert fake.called("policy_decide")[-1][1]["explain"] is True
    doc = json.loads(cli("policy", "explain", "wf", "step", "-o", "json").stdout)
    assert doc["explain"][1]["matched"] == ["patches-need-oncall"] and doc["constraints"] == {"max_cost_usd": "5"}


def test_policy_simulate(fake: FakeClient, tmp_path: Path) -> None:
    draft = tmp_path / "draft.cedar"
    draft.write_text("permit(principal, action, resource);")
    fake.answers["policy_simulate"] = PolicySimulation(checked=3, changes=[
        PolicyChange(run_id=RUN, step_id="apply_patch", was="allow", now="deny", rules=["r1"], reason="no")])
    result = cli("policy", "simulate", str(draft), "--limit", "10")
    lines = result.stdout.splitlines()
    assert lines[0] == f"re-decided 3 recent jobs with {draft}: 1 would change"
    assert "6f1c2a3b…" in result.stdout and "apply_patch" in result.stdout
    assert fake.called("policy_simulate")[-1] == ((draft.read_text(),), {"limit": 10})
    assert json.loads(cli("policy", "simulate", str(draft), "-o", "json").stdout)["checked"] == 3


# -- operations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", [["dlq"], ["dlq", "list"]])
def test_dlq_lists_by_default(fake: FakeClient, spelling: list[str]) -> None:
    fake.answers["dead_letter_entries"] = []
    assert cli(*spelling, "--limit", "5").stdout == "(none)\n"
    assert fake.called("dead_letter_entries")[-1] == ((5,), {"status": None, "service": None})


def _letter_entry(seq: int, record: Any = None) -> Any:
    from datetime import UTC, datetime

    from interlock.client import DeadLetterEntry
    from interlock.contracts import subjects as s
    from interlock.contracts.messages import DeadLetter

    letter = DeadLetter(service="planner", subject=s.trigger("default", "wf"), reason="bad input", data_b64="e30=",
                        at=datetime(2026, 12, 2, tzinfo=UTC))
    return DeadLetterEntry(seq, letter, True, record)


def test_dlq_list_shows_id_and_status_and_filters(fake: FakeClient) -> None:
    from datetime import UTC, datetime

    from interlock.contracts.messages import DeadLetterAction, DeadLetterStatus

    done = DeadLetterStatus(seq=8, status="resolved", actions=[DeadLetterAction(
        action="resolved", by="bob", at=datetime(2026, 12, 2, tzinfo=UTC), note="fixed the sender")])
    fake.answers["dead_letter_entries"] = [_letter_entry(7), _letter_entry(8, done)]
    rows = cli("dlq", "--status", "open", "--service", "planner").stdout.splitlines()
    assert fake.called("dead_letter_entries")[-1] == ((100,), {"status": "open", "service": "planner"})
    assert rows[0].split()[:3] == ["ID", "STATUS", "AT"]
    assert rows[2].split()[:2] == ["7", "open"] and rows[3].split()[:2] == ["8", "resolved"]
    [_, resolved] = json.loads(cli("dlq", "-o", "json").stdout)
    assert resolved["id"] == 8 and resolved["status"] == "resolved" and resolved["actions"][0]["note"] == \
        "fixed the sender"
    assert cli("dlq", "--status", "gone").exit_code == 2  # not a status


def test_dlq_resolve_and_replay_call_the_client_and_say_what_happened(fake: FakeClient) -> None:
    from datetime import UTC, datetime

    from interlock.contracts import subjects as s
    from interlock.contracts.messages import DeadLetterAction, DeadLetterStatus

    at = datetime(2026, 12, 2, tzinfo=UTC)
    fake.answers["resolve_dead_letter"] = lambda seq, note: DeadLetterStatus(
        seq=seq, status="resolved", actions=[DeadLetterAction(action="resolved", by="bob", at=at, note=note)])
    result = cli("dlq", "resolve", "7", "--note", "sender fixed")
    assert result.stdout == "dead letter 7 resolved by bob: sender fixed\n"
    assert fake.called("resolve_dead_letter")[-1] == ((7,), {"note": "sender fixed"})
    assert cli("dlq", "resolve", "7").exit_code == 2  # --note is required
    assert cli("dlq", "resolve", "7", "--note", " ").stderr == \
        "interlock: --note must say how the dead letter was dealt with\n"
    fake.answers["replay_dead_letter"] = lambda seq, note: DeadLetterStatus(
        seq=seq, status="replayed", actions=[DeadLetterAction(
            action="replayed", by="bob", at=at, note=note, msg_id=f"dlq-replay:{seq}:1", subject=s.result("t", "r"),
            stream_seq=42)])
    assert cli("dlq", "replay", "7").stdout == \
        f"dead letter 7 replayed to {s.result('t', 'r')} (message id dlq-replay:7:1, stream seq 42) by bob\n"
    assert fake.called("replay_dead_letter")[-1] == ((7,), {"note": ""})
    assert cli("dlq", "replay", "0").exit_code == 2  # ids start at 1


def test_drill_options_reach_the_drill(monkeypatch: pytest.MonkeyPatch) -> None:
    import interlock.devstack.drill as drill

    seen: dict[str, Any] = {}

    def drill_command(**kwargs: Any) -> int:
        seen.update(kwargs)
        return 3

    monkeypatch.setattr(drill, "drill_command", drill_command)
    result = cli("drill", "--runs", "5", "--kills", "1", "--cluster", "--seed", "7", "--timeout", "30",
                 "--home", "/tmp/d", "--nats", "nats://a:1,nats://b:2", "--copies", "3")
    assert result.exit_code == 3
    assert seen == {"runs": 5, "kills": 1, "cluster": True, "seed": 7, "timeout": 30.0, "home": Path("/tmp/d"),
                    "nats_url": "nats://a:1,nats://b:2", "copies": 3}
    assert cli("drill", "--runs", "0").exit_code == 2
    assert cli("drill", "--copies", "0").exit_code == 2


def test_demo_passes_auto_approve(monkeypatch: pytest.MonkeyPatch) -> None:
    import interlock.devstack.demo as demo

    seen: list[dict[str, Any]] = []

    def run_demo(**kwargs: Any) -> int:
        seen.append(kwargs)
        return 0

    monkeypatch.setattr(demo, "run_demo", run_demo)
    assert cli("demo", "--auto-approve", "--timeout", "9").exit_code == 0
    assert cli("demo").exit_code == 0
    assert seen == [{"auto_approve": True, "home": Path(".interlock/demo"), "timeout": 9.0},
                    {"auto_approve": False, "home": Path(".interlock/demo"), "timeout": 120.0}]


def test_worker_rejects_a_target_that_is_not_a_worker(tmp_path: Path) -> None:
    module = tmp_path / "agents_x.py"
    module.write_text("worker = 42\n")
    result = cli("worker", f"{module}:worker")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"interlock: {module}:worker is not an interlock.worker.Worker"
    assert cli("worker", f"{module}:nothing").stderr.strip() == f"interlock: {module} has no attribute 'nothing'"


def test_a_mistyped_run_verb_is_pointed_out(fake: FakeClient) -> None:
    fake.answers["start_run"] = NotFound("workflow lst is not registered")
    result = cli("run", "lst")  # `run WORKFLOW` makes this `run start lst`
    assert result.exit_code == 1
    assert result.stderr == "interlock: workflow lst is not registered; did you mean `interlock run list`?\n"
    fake.answers["start_run"] = NotFound("workflow deploy is not registered")
    assert cli("run", "deploy").stderr == "interlock: workflow deploy is not registered\n"


def test_schedules_lists_next_tick_and_last_run(fake: FakeClient) -> None:
    fake.answers["schedules"] = [
        ScheduleRow(workflow_id="nightly", workflow_version="3", tenant="default", cron="30 2 * * *",
                    timezone="Europe/Berlin", missed="catch_up_once", next_tick="2026-12-03T01:30:00Z", armed=True,
                    last_tick="2026-12-02T01:30:00Z", last_run_id=RUN, last_run_status="succeeded"),
        ScheduleRow(workflow_id="poll", workflow_version="1", tenant="default", every="10m", timezone="UTC",
                    missed="skip", next_tick="2026-12-02T04:20:00Z", armed=False, last_tick="2026-12-02T04:10:00Z")]
    result = cli("schedules", "--workflow", "nightly")
    assert result.exit_code == 0, result.output
    assert fake.called("schedules") == [((), {"workflow_id": "nightly"})]
    lines = result.stdout.splitlines()
    nightly = next(line for line in lines if "nightly" in line)
    for cell in ("cron 30 2 * * *", "Europe/Berlin", "catch_up_once", "2026-12-03 01:30:00 UTC", "yes",
                 f"{RUN} (succeeded)"):
        assert cell in nightly, (cell, nightly)
    poll = next(line for line in lines if "poll" in line)
    assert "every 10m" in poll and "not yet" in poll and "—" in poll
    as_json = json.loads(cli("schedules", "-o", "json").stdout)
    assert as_json[0]["cron"] == "30 2 * * *" and "last_run" not in as_json[0]  # the rows as the query gives them
