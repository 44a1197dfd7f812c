"""``interlock audit verify|rebuild``."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from interlock.cli._common import connected, with_globals
from interlock.cli._output import Format, OutputOption, echo, emit_doc
from interlock.client import Client
from interlock.core.verify import VerifyReport, render_report

app = typer.Typer(no_args_is_help=True, help="Verify hash chains; rebuild the auditor's projection.")


@app.command("verify")
@with_globals
def verify(ctx: typer.Context, run: Annotated[str, typer.Argument(metavar="RUN", help="run id")],
           output: OutputOption = Format.table) -> None:
    """Verify a run's hash chain: any edited, dropped, inserted or reordered event is reported (exit 1)."""
    report: VerifyReport = connected(ctx, lambda client: client.verify(run))
    emit_doc(report, output, lambda _doc: echo(render_report(report)))
    raise typer.Exit(0 if report.ok else 1)


DEFAULT_DB = ".interlock/auditor.sqlite3"


@app.command("rebuild")
@with_globals
def rebuild(ctx: typer.Context, db: Annotated[str, typer.Option(
        "--db", metavar="FILE",
        help=f"the auditor's SQLite file (default: INTERLOCK_AUDITOR_DB, else {DEFAULT_DB})")] = "") -> None:
    """Rebuild the auditor's projection by replaying the event stream from the start."""
    from interlock.auditor.projection import Projection
    from interlock.core.eventstore import EventStore

    path = db or os.environ.get("INTERLOCK_AUDITOR_DB") or DEFAULT_DB

    async def work(client: Client) -> Any:
        projection = Projection(path)
        await projection.open()
        try:
            store = EventStore(client.nc, client.js, service="auditor")
            return await projection.rebuild(store, progress=lambda st: echo(f"  replayed {st.events} events"))
        finally:
            await projection.close()

    echo(f"projection {path} rebuilt: {connected(ctx, work)}")
