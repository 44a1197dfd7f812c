"""``interlock creds issue|list|revoke`` and ``interlock provision``: credentials from an identity
home, and the streams and buckets of a deployed cluster (with the admin credential)."""

from __future__ import annotations

import asyncio
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from interlock.cli._common import connected, fail, globals_of, with_globals
from interlock.cli._output import Column, Format, OutputOption, columns, echo, emit_rows
from interlock.client import Client
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.identity import ROLE_NAMES, IdentityError, IdentityHome, RoleError, creds_permissions
from interlock.identity import role as lookup_role

DEFAULT_HOME = Path(".interlock") / "identity"
HOME_ENV = "INTERLOCK_IDENTITY_HOME"

app = typer.Typer(no_args_is_help=True, help=(
    "Credentials (.creds files) issued from an identity home: NATS decentralized JWT accounts. "
    f"The home is --home, else {HOME_ENV}, else {DEFAULT_HOME} (the one `interlock up` creates). "
    "A new credential works at once; a revoked one is cut off within seconds, with no restart."))

HomeOption = Annotated[Path | None, typer.Option(
    "--home", metavar="DIR", help=f"identity home (default: {HOME_ENV}, else {DEFAULT_HOME})")]


def identity_home(home: Path | None) -> IdentityHome:
    """The identity home the command works on; one that does not exist is an error, not created."""
    root = home or (Path(os.environ[HOME_ENV]) if os.environ.get(HOME_ENV) else DEFAULT_HOME)
    if not (root / "operator.jwt").is_file():
        fail(f"{root} is not an identity home (no operator.jwt): `interlock up` creates {DEFAULT_HOME}; "
             "give another with --home or INTERLOCK_IDENTITY_HOME")
    try:
        return IdentityHome(root)
    except (IdentityError, OSError) as e:
        fail(f"{root}: {e}")


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str) -> datetime | timedelta:
    """``30d``, ``12h``, ``90m``, ``2w`` (from now) or an ISO date/time (UTC if no zone)."""
    match = _DURATION.match(text.strip())
    if match:
        return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither a duration (30d, 12h, 90m, 2w) nor an ISO date/time") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@app.command("issue")
def issue(
    role: Annotated[str, typer.Option("--role", metavar="ROLE", help=f"one of: {', '.join(ROLE_NAMES)}")],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="where to write the .creds file (mode 0600)")],
    tenant: Annotated[str | None, typer.Option(
        "--tenant", metavar="TENANT", help="the tenant of a worker or person (services serve every tenant: none)")
    ] = None,
    topics: Annotated[list[str] | None, typer.Option(
        "--topics", metavar="TOPIC", help="a worker's job topic (repeatable, or comma-separated)")] = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", metavar="WHEN", help="a duration from now (30d, 12h) or an ISO date/time; default: never")
    ] = None,
    name: Annotated[str | None, typer.Option(
        "--name", metavar="NAME", help="the principal (an approver's decisions are recorded under it); "
                                       "default: ROLE-TENANT, or ROLE for a service")] = None,
    home: HomeOption = None,
) -> None:
    """Issue a credential of ROLE (for TENANT, with a worker's TOPICS) and write it to FILE.

    Examples: a worker of tenant acme serving two topics, and a person who approves:

      interlock creds issue --role worker --tenant acme --topics triage --topics fix --out triage.creds

      interlock creds issue --role approver --tenant acme --name alice --expires 30d --out alice.creds
    """
    try:
        lookup_role(role)
    except RoleError as e:
        raise typer.BadParameter(str(e), param_hint="--role") from None
    wanted = [t.strip() for item in topics or [] for t in item.split(",") if t.strip()]
    at = parse_expiry(expires) if expires else None
    identity = identity_home(home)
    try:
        path = identity.issue(role, tenant, wanted, name=name, expires=at, out=out)
    except (IdentityError, RoleError, ValueError) as e:
        fail(str(e))
    principal = next(u for u in reversed(identity.list()) if u.creds == str(path))
    until = datetime.fromtimestamp(principal.expires, UTC).isoformat() if principal.expires else "never"
    echo(f"issued {principal.role} credential {principal.name!r} (tenant {principal.tenant}, expires {until}) "
         f"to {path}")
    echo(f"connect with it: INTERLOCK_CREDS={path} (or --creds {path})")
    echo(_publish_if_up(identity))


def _publish_if_up(identity: IdentityHome, nats: str | None = None, creds: Path | None = None) -> str:
    """Publish the keyring to the server this machine's CLI reaches (with its default credential),
    so a new key's signatures (an approver's) are trusted, and a revoked key's refused, at once;
    a hint when that is not possible."""
    async def publish() -> str:
        client = await Client.connect(nats, creds=creds)
        try:
            return await _publish_keyring(client, identity)
        finally:
            await client.close()

    try:
        return asyncio.run(publish())
    except Exception as e:
        return (f"the keyring was not published (no server reached: {e or type(e).__name__}); run `interlock "
                f"provision --home {identity.root}` with the admin credential before its signatures are needed")


SERVICE_KINDS = ("planner", "policy", "approval", "dispatcher", "auditor", "api")
EXAMPLE_WORKER = "example-agents"
SERVER_CONFIG = "server.json"


@app.command("init")
def init(
    home: Annotated[Path, typer.Option("--home", metavar="DIR", help="the identity home to create or reuse")],
    tenant: Annotated[str, typer.Option("--tenant", metavar="TENANT", help="tenant of admin and the example worker")
                      ] = "default",
) -> None:
    """Bootstrap a deployment's identity home (deploy/, docker-compose): the operator and accounts,
    the server config include ``server.json``, and ``creds/{name}.creds`` for each service kind,
    ``admin`` and the example agents' worker.

    Idempotent: a second run reuses every credential that still fits (get-or-issue)."""
    from interlock.devstack import example_file
    from interlock.devstack.targets import TargetError, worker_topics

    try:
        identity = IdentityHome(home)
        issued = {kind: identity.get_or_issue(kind, name=kind) for kind in SERVICE_KINDS}
        issued["admin"] = identity.get_or_issue("admin", tenant, name="admin")
        topics = worker_topics(f"{example_file('agents.py')}:worker")
        issued[EXAMPLE_WORKER] = identity.get_or_issue("worker", tenant, topics, name=EXAMPLE_WORKER)
        config = identity.write_server_config(home / SERVER_CONFIG)
    except (IdentityError, RoleError, TargetError, OSError) as e:
        fail(f"{home}: {e}")
    echo(f"identity home {home}: server config {config}")
    for name, path in issued.items():
        echo(f"  {name:<15} {path}")


def _when(at: int | None) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if at else ""


@app.command("list")
def list_creds(output: OutputOption = Format.table, home: HomeOption = None) -> None:
    """Every credential issued from the identity home (revoked and expired ones too), oldest first."""
    rows = []
    for u in identity_home(home).list():
        status = "revoked" if u.revoked_at else ("active" if u.active else "expired")
        rows.append({"name": u.name, "role": u.role, "tenant": u.tenant, "topics": list(u.topics),
                     "status": status, "issued_at": _when(u.issued_at), "expires": _when(u.expires),
                     "revoked_at": _when(u.revoked_at), "public_key": u.public_key, "creds": u.creds})
    emit_rows(rows, output, columns("name", "role", "tenant", Column("topics", show=", ".join), "status",
                                    "issued_at", "expires", Column("public_key", show=lambda k: f"{k[:12]}…")))


@app.command("revoke")
@with_globals
def revoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="the credential's name (or its public key)")],
    home: HomeOption = None,
) -> None:
    """Revoke a credential and push the account to the running server (as the home's system user),
    which closes the user's connections within seconds and refuses it from then on; no restart.
    A name issued in several tenants needs --tenant.

    The server is --nats, else INTERLOCK_NATS_URL, else the URL `interlock up` wrote.
    """
    from interlock.client import ClientSettings

    identity = identity_home(home)
    try:
        principal = identity.revoke(name, globals_of(ctx).tenant)
    except IdentityError as e:
        fail(str(e))
    echo(f"revoked {principal.role} credential {principal.name!r} ({principal.public_key[:12]}…)")
    url, source = ClientSettings.load().resolve_url(globals_of(ctx).nats)
    try:
        asyncio.run(identity.push(url))
    except Exception as e:  # the server is down, refuses the system user, or does not trust this home
        fail(f"revoked in {identity.root}, but the server at {url} (from {source}) was not told: {e}. "
             "A server started from this home picks it up at start; else run this again when it is up")
    echo(f"pushed to {url}: its connections are closed and it is refused from now on")
    options = globals_of(ctx)
    echo(_publish_if_up(identity, nats=options.nats, creds=options.creds))


def _keyring_home(home: Path | None) -> IdentityHome | None:
    root = home or (Path(os.environ[HOME_ENV]) if os.environ.get(HOME_ENV) else DEFAULT_HOME)
    return identity_home(root) if home is not None or (root / "operator.jwt").is_file() else None


async def _publish_keyring(client: Client, identity: IdentityHome) -> str:
    try:
        written = await identity.publish_keyring(client.js)
    except Exception as e:  # not the admin credential, or the bucket is not provisioned
        return (f"the keyring was not published ({e or type(e).__name__}): services will not trust keys issued "
                f"since the last publish; run `interlock provision --home {identity.root}` with the admin credential")
    return f"keyring {s.KEYRING_BUCKET}: {written} key(s) published from {identity.root}"


@with_globals
def provision(ctx: typer.Context, home: HomeOption = None) -> None:
    """Create or update Interlock's streams, buckets and object store on a deployed cluster, and
    publish the identity home's keyring (the keys whose signatures services trust).

    Needs the admin credential (services have no right to change streams). Safe to run again.
    """
    import nats.errors

    from interlock.core.topology import provision as provision_streams

    async def work(client: Client) -> list[str]:
        create = p.js_stream("CREATE", s.EVENTS_STREAM)
        if client.creds is not None and not creds_permissions(client.creds).allows_publish(create):
            fail(f"{client.principal} ({client.creds}) may not provision: the credential lacks permission to "
                 f"publish to {create!r} (streams are changed with the admin credential: --creds or INTERLOCK_CREDS)")
        try:
            report = await provision_streams(client.js, int(os.environ.get("INTERLOCK_REPLICAS", "1")))
        except (nats.errors.Error, TimeoutError) as e:
            fail(f"provisioning as {client.creds or 'anonymous'} failed: {e or type(e).__name__} "
                 "(it needs the admin credential: --creds or INTERLOCK_CREDS)")
        identity = _keyring_home(home)
        if identity is None:
            return [*report, f"no identity home ({DEFAULT_HOME}, {HOME_ENV} or --home): keyring not published"]
        return [*report, await _publish_keyring(client, identity)]

    for line in connected(ctx, work):
        echo(line)
