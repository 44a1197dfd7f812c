"""The ``interlock`` command: noun-verb groups, the process commands, and today's spellings as
hidden aliases so existing scripts keep working."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from interlock.cli import (
    _admin_audit,
    _apikeys,
    _approval,
    _audit,
    _identity,
    _intervene,
    _observe,
    _ops,
    _policy,
    _run,
    _rundiff,  # noqa: F401  (adds `run diff` and `run failures` to the run group)
    _schedules,
    _seals,
    _tenant,
    _workflow,
    _workload,
)
from interlock.cli._common import (
    CredsOption,
    NatsOption,
    TenantOption,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    VerboseOption,
    configure_logging,
    set_globals,
    with_globals,
)

app = typer.Typer(
    name="interlock",
    help="Durable, auditable orchestration of agent workflows on NATS JetStream.\n\n"
         "The connection options (--nats, --creds, --tenant, --tls-*, -v) may also follow a command's name.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # an unexpected error prints a plain traceback, never local variables
    context_settings={"help_option_names": ["-h", "--help"]},
)


def package_version() -> str:
    """The installed ``interlock`` distribution's version."""
    try:
        return version("interlock")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"interlock {package_version()}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    nats: NatsOption = None,
    creds: CredsOption = None,
    tenant: TenantOption = None,
    verbose: VerboseOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    show_version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True, help="print Interlock's version and exit")] = False,
) -> None:
    """Record the global options for the command that follows."""
    configure_logging(verbose)
    set_globals(ctx, nats=nats, creds=creds, tenant=tenant, verbose=verbose, tls_ca=tls_ca, tls_cert=tls_cert,
                tls_key=tls_key)


# -- noun-verb groups ----------------------------------------------------------------------------
app.add_typer(_run.app, name="run")
app.add_typer(_approval.app, name="approval")
app.add_typer(_workflow.app, name="workflow")
app.add_typer(_policy.app, name="policy")
app.add_typer(_approval.approvers, name="approver")
app.add_typer(_ops.agents, name="agent")
app.add_typer(_ops.dlq, name="dlq")
app.add_typer(_workload.breakers, name="breakers")
_workload.register(_ops.agents)
app.add_typer(_audit.app, name="audit")
app.add_typer(_identity.app, name="creds")
app.add_typer(_tenant.app, name="tenant")
app.command("cost")(_observe.cost)
app.command("alerts")(_observe.alerts)
app.command("schedules")(_schedules.schedules)
app.add_typer(_apikeys.app, name="apikeys")
_admin_audit.register(_audit.app)
_seals.register(_audit.app)
app.add_typer(_intervene.step, name="step")  # issue 17: intervene in a run, feedback on outputs
app.add_typer(_intervene.feedback, name="feedback")
_intervene.register(_run.app)

# -- processes -----------------------------------------------------------------------------------
PROCESSES = "Processes"
app.command("up", rich_help_panel=PROCESSES)(with_globals(_ops.up))
app.command("serve", rich_help_panel=PROCESSES)(with_globals(_ops.serve))
app.command("worker", rich_help_panel=PROCESSES)(with_globals(_ops.worker))
app.command("nats", rich_help_panel=PROCESSES)(_ops.nats)
app.command("demo", rich_help_panel=PROCESSES)(_ops.demo)
app.command("drill", rich_help_panel=PROCESSES)(_ops.drill)
app.command("provision", rich_help_panel=PROCESSES)(_identity.provision)

# -- today's spellings, hidden -------------------------------------------------------------------
ALIASES = {
    "runs": _run.list_runs,
    "status": _run.describe,
    "timeline": _run.timeline,
    "cancel": _run.cancel,
    "rerun": _run.rerun,
    "approvals": _approval.list_approvals,
    "approve": _approval.approve,
    "reject": _approval.reject,
    "validate": _workflow.validate,
}
for alias, command in ALIASES.items():
    app.command(alias, hidden=True)(command)
app.add_typer(_workflow.app, name="workflows", hidden=True)
app.add_typer(_approval.approvers, name="approvers", hidden=True)
app.add_typer(_ops.agents, name="agents", hidden=True)  # `interlock agents` lists; `interlock agents rollout …`


def main(argv: list[str] | None = None) -> int:
    """Run the ``interlock`` command line; the exit code (0 ok, 1 an error, 2 a usage error, 130 Ctrl-C)."""
    try:
        app(args=argv, prog_name="interlock")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
