"""``interlock audit verify|rebuild``."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from interlock.cli import _seals
from interlock.cli._common import connected, with_globals
from interlock.cli._output import Format, OutputOption, echo, emit_doc, plain
from interlock.client import Client
from interlock.core.verify import VerifyReport, render_report

app = typer.Typer(no_args_is_help=True, help="Verify hash chains; rebuild the auditor's projection.")


@app.command("verify")
@with_globals
def verify(ctx: typer.Context, run: Annotated[str | None, typer.Argument(
               metavar="[RUN]", help="run id (none: the whole event stream against its latest seal)")] = None,
           seals: _seals.SealsOption = None, output: OutputOption = Format.table) -> None:
    """Verify a run's hash chain: any edited, dropped, inserted or reordered event is reported (exit 1);
    and the run (or the whole stream) against the auditor's latest seal: truncation, purges, deleted
    messages, a re-created stream, a run rolled back (exit 1)."""
    async def work(client: Client) -> tuple[VerifyReport | None, _seals.SealReport]:
        report = await client.verify(run) if run is not None else None
        return report, await _seals.check(client, run, seals)

    report, sealed = connected(ctx, work)
    ok = sealed.ok and (report is None or report.ok)
    if report is None:
        emit_doc(sealed.to_json(), output, lambda _doc: echo(_seals.render(sealed)))
    else:
        emit_doc({**plain(report), "seals": sealed.to_json()}, output,
                 lambda _doc: echo(f"{render_report(report)}\n{_seals.render(sealed)}"))
    raise typer.Exit(0 if ok else 1)


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
