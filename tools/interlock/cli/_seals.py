"""``interlock audit seals`` and ``interlock audit seal export``, and the seal check of ``audit verify``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from interlock.cli._common import connected, fail, with_globals
from interlock.cli._output import Column, Format, OutputOption, echo, emit_rows, hash_column
from interlock.client import Client
from interlock.contracts import subjects as s
from interlock.core.eventstore import StoredCommit
from interlock.core.seal import Seal
from interlock.identity import Keyring
from interlock.runtime.seals import (
    SealError,
    SealReport,
    load_seal_file,
    render_seal_report,
    seal_verifier,
    verify_run_offline,
)

SealsOption = Annotated[Path | None, typer.Option(
    "--seals", metavar="FILE", help="check against this seal export (`interlock audit seal export`) instead of "
    "the IL_SEALS stream: catches a re-created stream whose seals were wiped too")]

seal_app = typer.Typer(no_args_is_help=True, help="Export the auditor's seals of the event stream.")

COLUMNS = [Column("number", "#"), Column("sealed_at", show=lambda at: str(at or "")[:23]), Column("reason"),
           Column("last_seq", "LAST SEQ"), Column("messages"), Column("runs"), Column("changed"),
           hash_column("heads_root", "HEADS ROOT"), hash_column("signer")]


def _row(seal: Seal) -> dict[str, Any]:
    return {"number": seal.number, "sealed_at": seal.sealed_at, "reason": seal.reason, "stream": seal.stream,
            "created": seal.created, "first_seq": seal.first_seq, "last_seq": seal.last_seq,
            "messages": seal.messages, "runs": seal.runs, "changed": len(seal.heads), "heads_root": seal.heads_root,
            "hash": seal.hash, "prev": seal.prev, "signer": seal.signer}


def seals_command(ctx: typer.Context, output: OutputOption = Format.table) -> None:
    """List the auditor's seals of the event stream, oldest first (each: how far the stream went, how
    many runs, the Merkle root of their heads, who signed)."""
    emit_rows([_row(seal) for seal in connected(ctx, lambda client: client.seals())], output, COLUMNS)


@seal_app.command("export")
@with_globals
def export(ctx: typer.Context) -> None:
    """Write every seal, one JSON line each, as stored and signed (`> seals.jsonl`): keep the file
    somewhere else, and check a stream against it with `interlock audit verify --seals seals.jsonl`."""
    for seal in connected(ctx, lambda client: client.seals()):
        echo(seal.encode().decode())


async def check(client: Client, run: str | None, seals_file: Path | None, keyring: Keyring | None = None
                ) -> SealReport:
    """The seal check of ``audit verify``: the run's log (or, without a run, the whole stream)."""
    return await client.verify_seals(run, seals_file=seals_file, keyring=keyring)


def check_offline(run_id: str, tenant: str, commits: Sequence[StoredCommit], seals_file: Path,
                  keyring: Keyring) -> SealReport:
    """The seal check of ``audit verify --offline``: the exported run's head against the seal file."""
    try:
        return verify_run_offline(s.run_events(tenant, run_id), [(c.stream_seq, c.envelopes) for c in commits],
                                  load_seal_file(seals_file), seal_verifier(keyring), source=str(seals_file))
    except SealError as e:
        fail(str(e))


def render(report: SealReport) -> str:
    return render_seal_report(report)


def register(audit: typer.Typer) -> None:
    """Add the commands to the ``interlock audit`` group."""
    audit.command("seals")(with_globals(seals_command))
    audit.add_typer(seal_app, name="seal")
