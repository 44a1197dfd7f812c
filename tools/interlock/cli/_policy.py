"""``interlock policy publish|rollback|show|history|eval|explain|simulate``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from interlock.cli._common import connected, read_text, user, with_globals
from interlock.cli._output import (
    Column,
    Format,
    OutputOption,
    columns,
    echo,
    emit_doc,
    emit_rows,
    hash_column,
    readable,
    short_hash,
)
from interlock.cli._run import parse_input
from interlock.client import Client, PolicyDecision

app = typer.Typer(no_args_is_help=True,
                  help="Publish, roll back, inspect and test policy bundles (Cedar); changes apply without restarts.")


@app.command("publish")
@with_globals
def publish(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(metavar="FILE", help="Cedar policy file")],
    version: Annotated[str | None, typer.Option("--version", help="bundle version (default: previous + 1)")] = None,
) -> None:
    """Make a Cedar bundle the active policy in every service."""
    source = read_text(file)
    record = connected(ctx, lambda client: client.policy_publish(source, version=version, by=user()))
    echo(f"policy bundle {record.snapshot_id} is active (revision {record.revision})")


@app.command("rollback")
@with_globals
def rollback(
    ctx: typer.Context,
    to: Annotated[str | None, typer.Option("--to", metavar="VERSION",
                                           help="version to return to (default: the previous one)")] = None,
) -> None:
    """Make the previous (or --to VERSION) bundle active again."""
    record = connected(ctx, lambda client: client.policy_rollback(to=to, by=user()))
    echo(f"rolled back: policy bundle {record.snapshot_id} is active (revision {record.revision})")


def _render_bundle(bundle: dict[str, Any]) -> None:
    note = " (built-in default: nothing published)" if bundle.get("builtin") else ""
    echo(f"# snapshot {bundle['snapshot_id']}{note}")
    echo(bundle["source"])


@app.command("show")
@with_globals
def show(ctx: typer.Context, output: OutputOption = Format.table) -> None:
    """The active bundle: its snapshot id and Cedar source."""
    emit_doc(connected(ctx, lambda client: client.policy_active()), output, _render_bundle)


@app.command("history")
@with_globals
def history(ctx: typer.Context, output: OutputOption = Format.table) -> None:
    """Every published bundle, oldest first."""
    emit_rows(connected(ctx, lambda client: client.policy_history()), output,
              columns("revision", "version", hash_column("snapshot_id", "SNAPSHOT"), "published_at",
                      Column("published_by", "BY")))


def render_decision(decision: dict[str, Any]) -> None:
    """A decision for people: what, under which snapshot, by which rules, and why."""
    rules = ", ".join(decision["rule_ids"]) or "-"
    echo(f"{decision['decision']} under {short_hash(decision['snapshot_id'])} (rules {rules})"
         + (f": {decision['reason']}" if decision.get("reason") else ""))
    if decision.get("approver_role"):
        echo(f"  approver role {decision['approver_role']}, expires in {decision.get('approval_expires_ms') or '-'} ms")
    if decision.get("constraints"):
        echo(f"  constraints {readable(decision['constraints'])}")
    for match in decision.get("explain") or []:
        echo(f"  {match['action']}: {match['decision']}; matched {', '.join(match['matched']) or 'nothing'}"
             + (f"; errors {'; '.join(match['errors'])}" if match.get("errors") else ""))


WorkflowArg = Annotated[str, typer.Argument(metavar="WORKFLOW", help="registered workflow id")]
StepArg = Annotated[str, typer.Argument(metavar="STEP", help="step id in that workflow")]
InputOption = Annotated[str | None, typer.Option(
    "--input", metavar="JSON|@FILE", help="the job's resolved input: JSON, or @file holding JSON (default {})")]
VersionOption = Annotated[str | None, typer.Option("--version", help="workflow version (default: the latest)")]


def _decide(ctx: typer.Context, workflow: str, step: str, input: str | None, version: str | None, *,
            explain: bool) -> PolicyDecision:
    job_input = parse_input(input)

    async def work(client: Client) -> PolicyDecision:
        return await client.policy_decide(workflow, step, job_input, version=version, explain=explain)

    return connected(ctx, work)


@app.command("eval")
@with_globals
def eval_(ctx: typer.Context, workflow: WorkflowArg, step: StepArg, input: InputOption = None,
          version: VersionOption = None, output: OutputOption = Format.table) -> None:
    """Decide one job with the active policy."""
    emit_doc(_decide(ctx, workflow, step, input, version, explain=False), output, render_decision)


@app.command("explain")
@with_globals
def explain(ctx: typer.Context, workflow: WorkflowArg, step: StepArg, input: InputOption = None,
            version: VersionOption = None, output: OutputOption = Format.table) -> None:
    """Decide one job and show which rules matched, per action."""
    emit_doc(_decide(ctx, workflow, step, input, version, explain=True), output, render_decision)


@app.command("simulate")
@with_globals
def simulate(
    ctx: typer.Context,
    draft: Annotated[str, typer.Argument(metavar="DRAFT", help="draft Cedar policy file")],
    limit: Annotated[int, typer.Option("--limit", min=1, help="re-decide at most this many recent jobs")] = 500,
    output: OutputOption = Format.table,
) -> None:
    """Re-decide recent jobs with a draft bundle and list the decisions that would change."""
    source = read_text(draft)
    result = connected(ctx, lambda client: client.policy_simulate(source, limit=limit))
    if output is Format.json:  # the whole result, with how many jobs were checked
        emit_doc(result, output, render=echo)
        return
    if output is Format.table:
        echo(f"re-decided {result.checked} recent jobs with {draft}: {len(result.changes)} would change")
    emit_rows(result.changes, output,
              columns(Column("run_id", "RUN", lambda run_id: short_hash(run_id, 8)), Column("step_id", "STEP"),
                      "was", "now", "rules", "reason"))
