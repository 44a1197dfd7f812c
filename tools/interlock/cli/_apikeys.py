"""``interlock apikeys create|list|revoke``: keys of the HTTP API (stored hashed in ``il_apikeys``).

Needs a credential that may write the bucket: admin (the default after `interlock up`)."""

from __future__ import annotations

from typing import Annotated

import typer

from interlock.cli._common import connected, user
from interlock.cli._output import Format, OutputOption, columns, echo, emit_rows
from interlock.client import Client
from interlock.runtime.apikeys import API_KEY_ROLES

app = typer.Typer(no_args_is_help=True, help=(
    "HTTP API keys: each acts for one tenant, with one role and a principal (approvals through the API are "
    "attributed to it). A key is shown once, when created; only its SHA-256 is stored."))


def _check_role(role: str) -> str:
    if role not in API_KEY_ROLES:
        raise typer.BadParameter(f"unknown role {role!r}; roles are: {', '.join(API_KEY_ROLES)}", param_hint="--role")
    return role


@app.command("create")
def create(
    ctx: typer.Context,
    role: Annotated[str, typer.Option("--role", metavar="ROLE", help=f"one of: {', '.join(API_KEY_ROLES)}",
                                      callback=_check_role)],
    tenant: Annotated[str | None, typer.Option("--tenant", metavar="TENANT",
                                               help="the key's tenant (default: the global --tenant)")] = None,
    principal: Annotated[str | None, typer.Option(
        "--principal", metavar="NAME", help="who the key acts as (default: key-ID)")] = None,
) -> None:
    """Create a key and print it once (keep it: it cannot be shown again)."""
    async def work(client: Client) -> tuple[str, str, str]:
        scoped = client.with_tenant(tenant) if tenant else client
        record, key = await scoped.create_api_key(role, principal=principal, by=user())
        return key, record.key_id, f"{record.principal} (tenant {record.tenant}, role {record.role})"

    key, key_id, who = connected(ctx, work)
    echo(f"API key {key_id} for {who}; shown once:")
    echo(key)


@app.command("list")
def list_keys(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option("--tenant", metavar="TENANT", help="default: the global --tenant")
                      ] = None,
    output: OutputOption = Format.table,
) -> None:
    """The tenant's keys (ids, roles, principals; never the keys)."""
    async def work(client: Client) -> list[dict[str, object]]:
        scoped = client.with_tenant(tenant) if tenant else client
        return [r.model_dump(exclude={"sha256"}) for r in await scoped.api_keys()]

    rows = connected(ctx, work)
    emit_rows(rows, output, columns("key_id", "tenant", "role", "principal", "created_at", "created_by", "revoked_at"),
              title="API keys")


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="the key's id (see `interlock apikeys list`)")],
    tenant: Annotated[str | None, typer.Option("--tenant", metavar="TENANT", help="default: the global --tenant")
                      ] = None,
) -> None:
    """Revoke a key: the API refuses it within seconds."""
    async def work(client: Client) -> str:
        scoped = client.with_tenant(tenant) if tenant else client
        record = await scoped.revoke_api_key(key_id, by=user())
        return f"revoked API key {record.key_id} ({record.principal}, tenant {record.tenant})"

    echo(connected(ctx, work))
