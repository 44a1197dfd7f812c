"""``interlock tenant keys rotate|list`` and ``interlock tenant forget``: the tenants' data keys, which
seal their sensitive payload values (see :mod:`interlock.runtime.datakeys`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from interlock.cli._common import fail
from interlock.cli._output import Column, Format, OutputOption, echo, emit_rows
from interlock.contracts import subjects as s
from interlock.runtime.datakeys import DEFAULT_DATA_KEYS_FILE, FILE_ENV, DataKeyError, DataKeyring

app = typer.Typer(no_args_is_help=True, help=(
    "Tenants' data keys: sensitive payload values are sealed (AES-256-GCM) under their tenant's key. "
    f"The keyring is --keys-file, else {FILE_ENV}, else {DEFAULT_DATA_KEYS_FILE} (the one `interlock up` uses)."))
keys = typer.Typer(no_args_is_help=True, help="A tenant's data keys: rotate, list.")
app.add_typer(keys, name="keys")

KeysFileOption = Annotated[Path | None, typer.Option(
    "--keys-file", metavar="FILE", help=f"keyring file (default: {FILE_ENV}, else {DEFAULT_DATA_KEYS_FILE})")]
TenantArgument = Annotated[str, typer.Argument(metavar="TENANT", help="the tenant")]


def keyring(path: Path | None) -> DataKeyring:
    return DataKeyring(path or (Path(os.environ[FILE_ENV]) if os.environ.get(FILE_ENV) else DEFAULT_DATA_KEYS_FILE))


def _tenant(name: str) -> str:
    try:
        return s.token(name, "tenant")
    except s.SubjectError as e:
        raise typer.BadParameter(str(e)) from None


@keys.command("rotate")
def rotate(tenant: TenantArgument, keys_file: KeysFileOption = None) -> None:
    """Give TENANT a new active data key; older keys are kept to read what they sealed."""
    ring = keyring(keys_file)
    try:
        kid = ring.rotate(_tenant(tenant))
    except (DataKeyError, OSError) as e:
        fail(str(e))
    echo(f"tenant {tenant}: new active data key {kid} in {ring.path}")


@keys.command("list")
def list_keys(keys_file: KeysFileOption = None, output: OutputOption = Format.table) -> None:
    """Every tenant's data key ids: active, kept, destroyed (never the keys)."""
    ring = keyring(keys_file)
    try:
        tenants = ring.tenants()
    except (DataKeyError, OSError) as e:
        fail(str(e))
    rows = [{"tenant": name, "active": entry["active"] or "", "keys": entry["keys"],
             "destroyed": entry["destroyed"], "forgotten_at": entry["forgotten_at"] or ""}
            for name, entry in sorted(tenants.items())]
    emit_rows(rows, output, [Column("tenant"), Column("active"), Column("keys"), Column("destroyed"),
                             Column("forgotten_at")],
              title=f"data keys in {ring.path}")


@app.command("forget")
def forget(tenant: TenantArgument, keys_file: KeysFileOption = None,
           yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False) -> None:
    """Destroy every data key of TENANT (an erasure request): its sealed values become unreadable for
    good, while every run log, hash chain and verification stays intact."""
    name = _tenant(tenant)
    ring = keyring(keys_file)
    if not yes:
        typer.confirm(f"Destroy every data key of tenant {name} in {ring.path}? Its sealed values can never be "
                      "read again", abort=True)
    try:
        gone = ring.forget(name)
    except (DataKeyError, OSError) as e:
        fail(str(e))
    echo(f"tenant {name}: destroyed {len(gone)} data key(s){': ' + ', '.join(gone) if gone else ''}")
