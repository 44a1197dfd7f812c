"""``interlock run start|list|describe|timeline|cancel|rerun``."""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from interlock.cli._common import RunGroup, connected, fail, read_text, user, with_globals
from interlock.cli._output import Column, Format, OutputOption, columns, echo, emit_doc, emit_rows
from interlock.client import Client, NotFound, progress_line, timeline_line
from interlock.contracts import events as ev
from interlock.core.run import RunStatus

app = typer.Typer(cls=RunGroup, no_args_is_help=True,
                  help="Start runs, follow them, inspect, cancel and re-run them. "
                       "`interlock run WORKFLOW …` is short for `interlock run start WORKFLOW …`.")

RunArg = Annotated[str, typer.Argument(metavar="RUN", help="run id")]
TimeoutOption = Annotated[float | None, typer.Option(
    "--timeout", metavar="SECONDS", min=0, help="with --wait: give up (exit 1) after SECONDS")]
WaitOption = Annotated[bool, typer.Option("--wait", help="print each event as it is appended until the run ends; "
                                                         "exit 0 only if it succeeded")]


def parse_input(raw: str | None, option: str = "--input") -> Any:
    """``--input``: JSON, or ``@file`` holding JSON; absent: ``{}``."""
    if raw is None:
        return {}
    text = read_text(raw[1:]) if raw.startswith("@") else raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = raw if raw.startswith("@") else option
        fail(f"{where}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")


def progress_printer() -> Callable[[dict[str, Any]], None]:
    """An ``on_event`` callback printing one line per event: time since start, service, step#attempt, summary."""
    t0 = time.monotonic()
    return lambda envelope: echo(progress_line(envelope, time.monotonic() - t0))


async def _follow(client: Client, run_id: str, timeout: float | None) -> int:
    final = await client.wait(run_id, timeout=timeout, on_event=progress_printer())
    return 0 if final == ev.RunSucceeded.type_name else 1


@app.command("start")
@with_globals
def start(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(
        metavar="WORKFLOW", help="workflow id, as registered with `interlock workflow apply`")],
    input: Annotated[str | None, typer.Option("--input", metavar="JSON|@FILE",
                                              help="the run's input: JSON, or @file holding JSON (default {})")] = None,
    version: Annotated[str | None, typer.Option("--version", help="workflow version (default: the latest)")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", metavar="KEY", help="the same key never starts two runs (default: a new key)")] = None,
    priority: Annotated[int | None, typer.Option(
        "--priority", min=1, max=5, help="1 (lowest) to 5 (highest): a saturated topic hands out higher ones first "
                                         "(default: the workflow's priority, else 3)")] = None,
    wait: WaitOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """Start a run of a workflow."""
    run_input = parse_input(input)
    key = idempotency_key or f"cli-{time.time_ns()}"

    async def work(client: Client) -> int:
        try:
            run_id = await client.start_run(workflow, run_input, key=key, version=version, requested_by=user(),
                                            priority=priority)
        except NotFound as e:
            # `interlock run lst` reaches here as `run start lst`: point at the command meant
            verbs = [c.name for c in app.registered_commands if c.name and c.name != "start"]
            typo = difflib.get_close_matches(workflow, verbs, n=1)
            raise NotFound(f"{e}; did you mean `interlock run {typo[0]}`?" if typo else str(e)) from None
        echo(f"run {run_id} (workflow {workflow}, idempotency key {key})")
        return await _follow(client, run_id, timeout) if wait else 0

    raise typer.Exit(connected(ctx, work))


RUN_COLUMNS = columns("run_id", "workflow_id", Column("workflow_version", "VERSION"), "status", "started_at",
                      "ended_at")


@app.command("list")
@with_globals
def list_runs(
    ctx: typer.Context,
    status: Annotated[RunStatus | None, typer.Option("--status", help="only runs in this state")] = None,
    workflow: Annotated[str | None, typer.Option("--workflow", help="only runs of this workflow id")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many, newest first")] = 50,
    output: OutputOption = Format.table,
) -> None:
    """List runs, newest first."""
    rows = connected(ctx, lambda client: client.runs(status=status, workflow_id=workflow, limit=limit))
    emit_rows(rows, output, RUN_COLUMNS)


def decision_text(decision: dict[str, Any] | None) -> str:
    """A step's policy decision for people: ``allow (rules a, b)``."""
    if not decision:
        return ""
    rules = decision.get("rule_ids") or []
    return str(decision.get("decision", "?")) + (f" (rules {', '.join(rules)})" if rules else "")


STEP_COLUMNS = columns("step_id", "status", "attempt", Column("decision", show=decision_text),
                       Column("approval_status", "APPROVAL"), "error")


def _render_status(run: dict[str, Any]) -> None:
    echo(f"run {run.get('run_id')}  {run.get('workflow_id')} v{run.get('workflow_version')}  {run.get('status')}"
         + (" (paused)" if run.get("paused") else "") + (f" — {run['reason']}" if run.get("reason") else ""))
    emit_rows(run.get("steps", []), Format.table, STEP_COLUMNS)


@app.command("describe")
@with_globals
def describe(
    ctx: typer.Context,
    run: RunArg,
    output: OutputOption = Format.table,
    as_json: Annotated[bool, typer.Option("--json", hidden=True, help="same as -o json (today's spelling)")] = False,
) -> None:
    """A run and the state of each of its steps (from the auditor)."""
    result = connected(ctx, lambda client: client.status(run))
    emit_doc(result, Format.json if as_json else output, _render_status)


TIMELINE_COLUMNS = columns("seq", Column("at", show=lambda at: str(at or "")[11:23]), "service",
                           Column("step_id", "STEP"), "attempt", Column("summary", "EVENT"))


@app.command("timeline")
@with_globals
def timeline(ctx: typer.Context, run: RunArg, output: OutputOption = Format.table) -> None:
    """A run's events in order, each in one line (from the auditor)."""
    rows = connected(ctx, lambda client: client.timeline(run))
    if output is Format.table:
        for row in rows:
            echo(timeline_line(row))
    else:
        emit_rows(rows, output, TIMELINE_COLUMNS)


@app.command("cancel")
@with_globals
def cancel(
    ctx: typer.Context,
    run: RunArg,
    reason: Annotated[str, typer.Option("--reason", help="why, recorded in the run's log")] = "",
) -> None:
    """Cancel a run: running jobs are told to stop, nothing new is dispatched."""
    connected(ctx, lambda client: client.cancel(run, reason=reason))
    echo(f"run {run} cancelled")


@app.command("rerun")
@with_globals
def rerun(
    ctx: typer.Context,
    run: RunArg,
    from_step: Annotated[str, typer.Option("--from-step", metavar="STEP",
                                           help="run this step and everything downstream of it again")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan, start nothing")] = False,
    wait: WaitOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """Start a new run of the same workflow version and input from --from-step.

    Steps not downstream of --from-step keep their outputs; the plan is printed first.
    """

    async def work(client: Client) -> int:
        plan = await client.rerun_plan(run, from_step)
        echo(f"re-run of {run} from step {from_step}:")
        for step_id, again in plan.steps():
            echo(f"  {step_id:<24} {'run again' if again else 'reuse output'}")
        if dry_run:
            echo("(dry run: nothing started)")
            return 0
        run_id = await client.rerun(plan, requested_by=user())
        echo(f"run {run_id} started (re-run of {run})")
        return await _follow(client, run_id, timeout) if wait else 0

    raise typer.Exit(connected(ctx, work))
