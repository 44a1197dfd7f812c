"""``interlock approval list|approve|reject`` and ``interlock approver grant|revoke|list``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from interlock.cli._common import connected, with_globals
from interlock.cli._output import Column, Format, OutputOption, columns, echo, emit_rows, hash_column
from interlock.client import Client, ClientError

app = typer.Typer(no_args_is_help=True, help="Pending approvals: list them, approve or reject one.")
approvers = typer.Typer(no_args_is_help=True,
                        help="Who may approve, in which roles (enforced once anyone is registered).")

APPROVAL_COLUMNS = columns("run_id", "step_id", Column("approver_role", "ROLE"), hash_column("job_hash"),
                           "requested_at", "expires_at")


@app.command("list")
@with_globals
def list_approvals(ctx: typer.Context, output: OutputOption = Format.table) -> None:
    """Pending approvals, oldest first."""
    emit_rows(connected(ctx, lambda client: client.approvals()), output, APPROVAL_COLUMNS)


RunArg = Annotated[str, typer.Argument(metavar="RUN", help="run id")]
StepArg = Annotated[str, typer.Argument(metavar="STEP", help="the step waiting for approval")]
ByOption = Annotated[str | None, typer.Option(
    "--by", metavar="NAME", hidden=True,
    help="deprecated: the approver is the principal you connect as (INTERLOCK_PRINCIPAL, else your creds' "
         "user name, else $USER); given, it must equal that principal")]
RoleOption = Annotated[str | None, typer.Option(
    "--role", help="the approver role you act in (default: the role the request asks for)")]
JobHashOption = Annotated[str | None, typer.Option(
    "--job-hash", metavar="SHA256", help="decide for this job hash (default: the pending request's)")]


def decide(ctx: typer.Context, run: str, step: str, *, grant: bool, by: str | None, role: str | None, reason: str,
           job_hash: str | None) -> None:
    """Show the pending request, then send the decision bound to its job hash (or ``job_hash``)."""

    async def work(client: Client) -> str:
        if by is not None and by != client.principal:
            raise ClientError(f"--by {by} is not the principal you are connected as ({client.principal}): the "
                              f"approver is always the connected principal (set INTERLOCK_PRINCIPAL or use its "
                              f"creds)")
        request = await client.pending_approval(run, step)
        echo(f"approval request: run {run} step {step}")
        echo(f"  job hash {request.job_hash}, policy snapshot {request.snapshot_id}, role {request.approver_role}")
        if request.input is not None:
            echo(f"  job input {json.dumps(request.input)[:400]}")
        bound = job_hash or request.job_hash
        bound_role = role or request.approver_role
        if grant:
            await client.approve(run, step, role=bound_role, job_hash=bound, reason=reason)
        else:
            await client.reject(run, step, role=bound_role, job_hash=bound, reason=reason)
        return client.principal

    principal = connected(ctx, work)
    echo(f"{'approved' if grant else 'rejected'} by {principal}")


@app.command("approve")
@with_globals
def approve(
    ctx: typer.Context,
    run: RunArg,
    step: StepArg,
    by: ByOption = None,
    role: RoleOption = None,
    reason: Annotated[str, typer.Option("--reason", help="why, recorded with the decision")] = "",
    job_hash: JobHashOption = None,
) -> None:
    """Approve a pending approval: prints the request, then approves exactly its job hash."""
    decide(ctx, run, step, grant=True, by=by, role=role, reason=reason, job_hash=job_hash)


@app.command("reject")
@with_globals
def reject(
    ctx: typer.Context,
    run: RunArg,
    step: StepArg,
    reason: Annotated[str, typer.Option("--reason", help="why (required), recorded with the decision")],
    by: ByOption = None,
    role: RoleOption = None,
    job_hash: JobHashOption = None,
) -> None:
    """Reject a pending approval: the step fails with the reason."""
    decide(ctx, run, step, grant=False, by=by, role=role, reason=reason, job_hash=job_hash)


NameArg = Annotated[str, typer.Argument(metavar="NAME", help="the approver's principal name (their creds' user name)")]


def _holds(name: str, roles: set[str]) -> None:
    echo(f"{name} holds {', '.join(sorted(roles)) or 'no role'}")


@approvers.command("grant")
@with_globals
def grant(ctx: typer.Context, name: NameArg,
          roles: Annotated[list[str], typer.Argument(metavar="ROLE...", help="roles to give")]) -> None:
    """Give an approver roles."""
    _holds(name, connected(ctx, lambda client: client.grant_approver(name, roles)))


@approvers.command("revoke")
@with_globals
def revoke(ctx: typer.Context, name: NameArg,
           roles: Annotated[list[str] | None, typer.Argument(
               metavar="[ROLE...]", help="roles to take away (default: all of them)")] = None) -> None:
    """Take roles away from an approver (all of them if none are named)."""
    _holds(name, connected(ctx, lambda client: client.revoke_approver(name, roles or None)))


@approvers.command("list")
@with_globals
def list_approvers(ctx: typer.Context, output: OutputOption = Format.table) -> None:
    """Registered approvers and their roles."""
    directory = connected(ctx, lambda client: client.approvers())
    rows = [{"approver": name, "roles": sorted(roles)} for name, roles in sorted(directory.items())]
    emit_rows(rows, output, columns("approver", "roles"))
