"""``interlock audit admin-changes``: who changed which stream or consumer, from the server's record."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from interlock.cli._common import connected, with_globals
from interlock.cli._output import Column, Format, OutputOption, emit_rows
from interlock.client import Client, ClientError
from interlock.contracts import subjects as s
from interlock.core.adminaudit import AdminAuditError, AdminChange, admin_changes
from interlock.identity import creds_permissions, decode_jwt, read_creds

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
REQUEST_CHARS = 90


def parse_since(text: str) -> datetime:
    """``30m``, ``24h``, ``7d`` (that long ago) or an ISO 8601 time (UTC unless it says otherwise)."""
    match = _DURATION.match(text.strip())
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither a duration (30m, 24h, 7d) nor an ISO 8601 time") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _refusal(creds: Any) -> str | None:
    """Why this connection's credential may not read the record (at once, rather than waiting for
    a reply the server will never send); None when it may, or holds no credential."""
    if not isinstance(creds, str | Path):
        return None
    path = Path(creds)
    subject = s.js_direct_get(s.ADMIN_AUDIT_STREAM)
    if creds_permissions(path).allows_publish(subject):
        return None
    principal = decode_jwt(read_creds(path)[0]).get("name") or path.name
    return (f"{principal} may not list the admin changes: the credential lacks permission to publish to "
            f"{subject!r} (reading {s.ADMIN_AUDIT_STREAM}); the admin credential may")


def _request(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        text = ", ".join(f"{k}={v}" for k, v in value.items())
    else:
        text = value if isinstance(value, str) else str(value)
    return text if len(text) <= REQUEST_CHARS else text[:REQUEST_CHARS - 1] + "…"


def _changed(change: AdminChange) -> dict[str, dict[str, Any]] | None:
    if change.changed is None:
        return None
    return {key: {"before": before, "after": after} for key, (before, after) in change.changed.items()}


def _row(change: AdminChange) -> dict[str, Any]:
    return {"when": change.at, "who": change.principal, "what": change.what,
            "outcome": "ok" if change.ok else f"refused: {change.error}", "changed": _changed(change),
            "request": change.request,
            "connection": change.connection, "user": change.user, "account": change.account,
            "host": change.host, "subject": change.subject, "seq": change.seq, "server": change.server}


def _detail(row: dict[str, Any]) -> str:
    """What the table shows of a change: the settings it changed, else (the start of) its request."""
    changed = row["changed"]
    if changed is not None:
        return "; ".join(f"{key}: {v['before']} → {v['after']}" for key, v in changed.items()) or "(no setting changed)"
    return _request(row["request"])


COLUMNS = [Column("when", show=lambda at: str(at or "")[:23]), Column("who"), Column("what"), Column("outcome"),
           Column("connection"), Column("detail", "CHANGED / REQUEST")]


def admin_changes_command(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option("--since", metavar="WHEN",
                                              help="only from then on: 30m, 24h, 7d or an ISO 8601 time")] = None,
    stream: Annotated[str | None, typer.Option("--stream", metavar="NAME", help="only changes of this stream")] = None,
    consumers: Annotated[bool, typer.Option("--consumers", help="also consumer creates, deletes and pauses")] = False,
    output: OutputOption = Format.table,
) -> None:
    """Changes to streams (create, update, delete, purge, message delete), oldest first: when, who
    (the principal of the credential), what, the outcome and the request, as the server recorded them."""
    start = parse_since(since) if since else None

    async def work(client: Client) -> list[AdminChange]:
        # the .creds file the connection authenticated with, whichever default chose it (nats-py
        # keeps it privately; a tuple or callback credential is not a file and is not checked)
        refusal = _refusal(getattr(client.nc, "_user_credentials", None))
        if refusal:
            raise ClientError(refusal)
        try:
            return await admin_changes(client.nc, since=start, stream=stream, consumers=consumers)
        except AdminAuditError as e:
            raise ClientError(str(e)) from None

    rows = [_row(change) for change in connected(ctx, work)]
    if output is Format.table:
        rows = [{**row, "detail": _detail(row)} for row in rows]
    emit_rows(rows, output, COLUMNS)


def register(audit: typer.Typer) -> None:
    """Add the command to the ``interlock audit`` group."""
    audit.command("admin-changes")(with_globals(admin_changes_command))
