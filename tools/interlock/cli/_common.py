"""What every command shares: the global options (also accepted after a command's name), one client
session per command, one-line errors, and groups with a default command."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import typer.core

from interlock.client import Client, ClientError

T = TypeVar("T")

CONNECTION_PANEL = "Connection"

NATS_HELP = "NATS URL, comma-separated for a cluster (default: INTERLOCK_NATS_URL, else the URL `interlock up` wrote)"
CREDS_HELP = "NATS credentials (.creds) file (default: INTERLOCK_CREDS)"
TLS_CA_HELP = "CA file (PEM) to verify the NATS server's certificate (default: INTERLOCK_TLS_CA, else the system's)"
TLS_CERT_HELP = "client certificate file (PEM), for a server that verifies clients (default: INTERLOCK_TLS_CERT)"
TLS_KEY_HELP = "the client certificate's private key file (PEM) (default: INTERLOCK_TLS_KEY)"
TENANT_HELP = "tenant (default: INTERLOCK_TENANT, else 'default')"
VERBOSE_HELP = "log at INFO level"


@dataclass
class Globals:
    """The global options, wherever on the command line they were given."""

    nats: str | None = None
    creds: Path | None = None
    tenant: str | None = None
    verbose: bool = False
    tls_ca: Path | None = None  # TLS: --tls-ca, --tls-cert, --tls-key
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def export_tls(self) -> None:
        """TLS: put the --tls-* options in the environment as INTERLOCK_TLS_*, for a process command's
        settings and the processes it starts."""
        for name in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None:
                os.environ[f"INTERLOCK_{name.upper()}"] = str(value.resolve())


def globals_of(ctx: typer.Context) -> Globals:
    """The root context's :class:`Globals` (created on first use, e.g. by a test invoking a sub-app)."""
    root = ctx.find_root()
    if not isinstance(root.obj, Globals):
        root.obj = Globals()
    return root.obj


_owns_logging: bool | None = None  # decided on the first call: did this process leave logging to us?


def configure_logging(verbose: bool) -> None:
    """INFO with ``-v``, else WARNING, FastStream's INFO chatter off; only in a process whose logging
    nobody had set up (a program or test that invokes the app keeps its own)."""
    global _owns_logging
    if _owns_logging is None:
        _owns_logging = not logging.getLogger().handlers
        if _owns_logging:
            from interlock.runtime import logs

            logs.configure("text", service="cli")
    if _owns_logging:
        logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
        logging.getLogger("faststream").setLevel(logging.WARNING)


def user(fallback: str = "cli") -> str:
    """Who is at the keyboard, for ``requested_by`` and ``--by`` defaults."""
    return os.environ.get("USER", fallback)


def fail(message: str) -> NoReturn:
    """Report one line on stderr and exit 1."""
    typer.echo(f"interlock: {message}", err=True)
    raise typer.Exit(1)


def connected(ctx: typer.Context, work: Callable[[Client], Awaitable[T]]) -> T:
    """Connect with the global options, run ``work``, close; a :class:`ClientError` becomes one
    ``interlock: …`` line and exit code 1."""
    options = globals_of(ctx)

    async def session() -> T:
        client = await Client.connect(options.nats, creds=options.creds, tenant=options.tenant,
                                      tls_ca=options.tls_ca, tls_cert=options.tls_cert, tls_key=options.tls_key,
                                      url_from="--nats")
        if client.url_source.startswith("default"):  # nothing named a server: say which one this is
            typer.echo(f"interlock: using the NATS server at {client.url} ({client.url_source})", err=True)
        try:
            return await work(client)
        finally:
            await client.close()

    try:
        return asyncio.run(session())
    except ClientError as e:
        fail(str(e))


def read_text(path: str, what: str = "file") -> str:
    """A small local file's text; a missing or unreadable file is a one-line error."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        fail(f"{path}: no such {what}")
    except OSError as e:
        fail(f"{path}: {e.strerror or e}")


NatsOption = Annotated[str | None, typer.Option("--nats", metavar="URL", help=NATS_HELP,
                                                rich_help_panel=CONNECTION_PANEL)]
CredsOption = Annotated[str | None, typer.Option("--creds", metavar="FILE", help=CREDS_HELP,
                                                 rich_help_panel=CONNECTION_PANEL)]
TenantOption = Annotated[str | None, typer.Option("--tenant", metavar="TENANT", help=TENANT_HELP,
                                                  rich_help_panel=CONNECTION_PANEL)]
TlsCaOption = Annotated[str | None, typer.Option("--tls-ca", metavar="FILE", help=TLS_CA_HELP,
                                                rich_help_panel=CONNECTION_PANEL)]
TlsCertOption = Annotated[str | None, typer.Option("--tls-cert", metavar="FILE", help=TLS_CERT_HELP,
                                                  rich_help_panel=CONNECTION_PANEL)]
TlsKeyOption = Annotated[str | None, typer.Option("--tls-key", metavar="FILE", help=TLS_KEY_HELP,
                                                 rich_help_panel=CONNECTION_PANEL)]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP, rich_help_panel=CONNECTION_PANEL)]

_GLOBAL_PARAMS = (
    inspect.Parameter("nats", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=NatsOption),
    inspect.Parameter("creds", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=CredsOption),
    inspect.Parameter("tenant", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=TenantOption),
    inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOption),
    inspect.Parameter("tls_ca", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=TlsCaOption),
    inspect.Parameter("tls_cert", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=TlsCertOption),
    inspect.Parameter("tls_key", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=TlsKeyOption),
)


def set_globals(ctx: typer.Context, *, nats: str | None = None, creds: str | None = None, tenant: str | None = None,
                verbose: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
                tls_key: str | None = None) -> None:
    """Record global options given at this level (later ones win over the root's)."""
    options = globals_of(ctx)
    for name, value in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)):  # TLS
        if value:
            setattr(options, name, Path(value))
    if nats:
        options.nats = nats
    if creds:
        options.creds = Path(creds)
    if tenant:
        options.tenant = tenant
    if verbose and not options.verbose:
        options.verbose = True
        configure_logging(True)


def with_globals(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Let a command also take the global options after its name (``interlock runs --tenant t``),
    as today's commands did and as the nats CLI does. ``fn``'s first parameter is the context."""
    hints = typing.get_type_hints(fn, include_extras=True)
    signature = inspect.signature(fn)
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]

    @functools.wraps(fn)
    def command(ctx: typer.Context, *args: Any, **kwargs: Any) -> Any:
        set_globals(ctx, **{name: kwargs.pop(name) for name in GLOBAL_NAMES})
        return fn(ctx, *args, **kwargs)

    del command.__wrapped__  # Typer reads the signature below, not fn's
    command.__signature__ = signature.replace(parameters=[*params, *_GLOBAL_PARAMS])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in (*params, *_GLOBAL_PARAMS)}
    return command


GLOBAL_NAMES = ("nats", "creds", "tenant", "verbose", "tls_ca", "tls_cert", "tls_key")


class DefaultGroup(typer.core.TyperGroup):
    """A group whose unknown first argument starts its default command: ``interlock run WORKFLOW``
    is ``interlock run start WORKFLOW``, ``interlock dlq`` is ``interlock dlq list``."""

    default_command: str = ""
    default_without_args: bool = False

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        if self.default_command and not ctx.resilient_parsing:
            if not args:
                if self.default_without_args:
                    args = [self.default_command]
            elif args[0] not in self.commands and args[0] not in ctx.help_option_names:
                args = [self.default_command, *args]
        return super().parse_args(ctx, args)


class RunGroup(DefaultGroup):
    """``interlock run WORKFLOW …`` (today's spelling) starts a run."""

    default_command = "start"


class ListGroup(DefaultGroup):
    """``interlock dlq`` (today's spelling) lists."""

    default_command = "list"
    default_without_args = True
