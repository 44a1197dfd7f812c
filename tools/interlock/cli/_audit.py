"""``interlock audit verify|export|keyring|rebuild``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from interlock.cli import _seals
from interlock.cli._common import connected, fail, with_globals
from interlock.cli._output import Format, OutputOption, echo, emit_doc, plain
from interlock.client import Client
from interlock.core.auditexport import ExportError, read_export
from interlock.core.verify import VerifyReport, render_report, verify_commits
from interlock.identity import Keyring
from interlock.runtime.signing import signing_enabled

app = typer.Typer(no_args_is_help=True, help=(
    "Verify run logs (online or offline), export them and the keyring; rebuild the auditor's projection."))


@app.command("verify")
@with_globals
def verify(ctx: typer.Context,
           run: Annotated[str | None, typer.Argument(
               metavar="[RUN]", help="run id (not with --offline; none: the whole event stream against its latest "
                                     "seal)")] = None,
           offline: Annotated[Path | None, typer.Option(
               "--offline", metavar="FILE", help="verify an export (`interlock audit export RUN > FILE`), no server")
           ] = None,
           keys: Annotated[Path | None, typer.Option(
               "--keys", metavar="FILE", help="the keyring to trust (`interlock audit keyring > FILE`); "
                                              "default online: the server's keyring bucket")] = None,
           seals: _seals.SealsOption = None,
           output: OutputOption = Format.table) -> None:
    """Verify a run's log: the hash chain (any edited, dropped, inserted or reordered event), every
    commit's signature and its signer's right to write what it holds, every approver's signature,
    and bytes that are not a commit; and the run (without RUN: the whole stream) against the
    auditor's latest seal: truncation, purges, deleted messages, a re-created stream, a run rolled
    back. Every problem is reported with its seq and stream seq (exit 1).

    Online: RUN, from the server. Offline: --offline FILE --keys FILE [--seals FILE], with no server."""
    keyring = _load_keyring(keys) if keys is not None else None
    sealed: _seals.SealReport | None = None
    if offline is not None:
        if run is not None:
            raise typer.BadParameter("give RUN or --offline FILE, not both", param_hint="RUN")
        if keyring is None:
            raise typer.BadParameter("--offline needs --keys FILE (the keyring to trust)", param_hint="--keys")
        try:
            with offline.open() as lines:
                run_id, tenant, commits = read_export(lines, str(offline))
        except OSError as e:
            fail(f"{offline}: cannot read ({e.strerror})")
        except ExportError as e:
            fail(str(e))
        report = verify_commits(commits, run_id=run_id, tenant=tenant, trust=keyring,
                                require_signatures=signing_enabled())
        if seals is not None:
            sealed = _seals.check_offline(run_id, tenant, commits, seals, keyring)
    elif run is None:
        stream = connected(ctx, lambda client: _seals.check(client, None, seals, keyring))
        emit_doc(stream.to_json(), output, lambda _doc: echo(_seals.render(stream)))
        raise typer.Exit(0 if stream.ok else 1)
    else:
        async def work(client: Client) -> tuple[VerifyReport, _seals.SealReport]:
            return await client.verify(run, keyring=keyring), await _seals.check(client, run, seals, keyring)

        report, sealed = connected(ctx, work)
    if sealed is None:
        emit_doc(report, output, lambda _doc: echo(render_report(report)))
        raise typer.Exit(0 if report.ok else 1)
    checked = sealed
    emit_doc({**plain(report), "seals": checked.to_json()}, output,
             lambda _doc: echo(f"{render_report(report)}\n{_seals.render(checked)}"))
    raise typer.Exit(0 if report.ok and checked.ok else 1)


def _load_keyring(path: Path) -> Keyring:
    try:
        return Keyring.load(path)
    except ValueError as e:
        fail(str(e))


@app.command("export")
@with_globals
def export(ctx: typer.Context, run: Annotated[str, typer.Argument(metavar="RUN", help="run id")]) -> None:
    """Write a run's log, exactly as stored (headers and signatures included), as JSON Lines to
    stdout, for `interlock audit verify --offline FILE --keys keyring.json`."""
    for line in connected(ctx, lambda client: client.export_run(run)):
        typer.echo(line)


@app.command("keyring")
@with_globals
def keyring(ctx: typer.Context) -> None:
    """Write the trusted keys (who each is, its role, tenant, when valid and revoked) and which role
    may write which event type, as JSON to stdout: the --keys file of an offline verify."""
    ring = connected(ctx, lambda client: client.keyring())
    typer.echo(ring.to_json())


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
