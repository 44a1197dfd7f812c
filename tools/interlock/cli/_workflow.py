"""``interlock workflow apply|list|validate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from interlock.cli._common import connected, with_globals
from interlock.cli._output import Column, Format, OutputOption, echo, emit_rows, short_hash
from interlock.client import Client, WorkflowInvalid
from interlock.contracts import subjects as s
from interlock.core.workflow import load_workflow, workflow_files

app = typer.Typer(no_args_is_help=True, help="Register, list and check workflow definitions.")


@app.command("apply")
@with_globals
def apply(ctx: typer.Context,
          file: Annotated[str, typer.Argument(metavar="FILE", help="workflow YAML file")]) -> None:
    """Register a workflow version from a YAML file (a version is immutable once registered),
    with the guard rule files it names (read beside it)."""
    try:
        text, files = workflow_files(file)  # size, UTF-8 and binary checks before anything is sent
    except WorkflowInvalid as e:
        echo(str(e))
        raise typer.Exit(1) from None

    async def work(client: Client) -> int:
        try:
            wf, created = await client.apply_workflow(text, filename=file, files=files)
        except WorkflowInvalid as e:
            echo(str(e))
            return 1
        echo(f"workflow {wf.id} v{wf.version} {'registered' if created else 'unchanged'} "
             f"(hash {short_hash(wf.content_hash)}); trigger subject {s.trigger(client.tenant, wf.id)}")
        return 0

    raise typer.Exit(connected(ctx, work))


@app.command("list")
@with_globals
def list_workflows(ctx: typer.Context, output: OutputOption = Format.table) -> None:
    """Registered workflow versions."""
    versions = connected(ctx, lambda client: client.workflows())
    emit_rows([{"workflow": wf, "version": version} for wf, version in versions], output,
              [Column("workflow"), Column("version")])


@app.command("validate")
def validate(files: Annotated[list[str], typer.Argument(metavar="FILE...", help="workflow YAML files")]) -> None:
    """Check workflow files without registering them: every problem, with file:line and location."""
    failed = 0
    for file in files:
        path = Path(file)
        if not path.is_file():
            echo(f"{file}: no such file")
            failed += 1
            continue
        try:
            wf = load_workflow(path)
        except WorkflowInvalid as e:
            echo(str(e))
            failed += 1
            continue
        echo(f"{file}: ok — workflow {wf.id} v{wf.version}, {len(wf.steps)} steps, hash {short_hash(wf.content_hash)}")
    raise typer.Exit(1 if failed else 0)
