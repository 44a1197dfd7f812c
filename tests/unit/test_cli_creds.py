"""``interlock creds issue|list|revoke``: files, output and one-line errors (no server)."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from interlock.cli._app import app
from interlock.cli._identity import parse_expiry
from interlock.contracts import subjects as s
from interlock.identity import IdentityHome, creds_permissions, read_creds


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    IdentityHome(tmp_path / "identity")
    return tmp_path / "identity"


def test_issue_writes_a_private_creds_file_of_the_role_and_list_shows_it(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "triage.creds"
    result = cli("creds", "issue", "--role", "worker", "--tenant", "acme", "--topics", "triage,fix",
                 "--name", "triage", "--expires", "30d", "--out", str(out), "--home", str(home))
    assert result.exit_code == 0, result.output
    assert "issued worker credential 'triage' (tenant acme" in result.output and str(out) in result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    read_creds(out)
    permissions = creds_permissions(out)
    assert permissions.allows_publish(s.job("acme", "triage")) is False  # jobs come from the stream
    assert permissions.allows_publish(s.result("acme", "r1")) and not permissions.allows_publish(s.result("b", "r1"))
    listed = json.loads(cli("creds", "list", "-o", "json", "--home", str(home)).output)
    assert [(r["name"], r["role"], r["tenant"], r["topics"], r["status"]) for r in listed] == [
        ("triage", "worker", "acme", ["triage", "fix"], "active")]
    assert listed[0]["expires"].startswith(str((datetime.now(UTC) + timedelta(days=30)).date()))
    table = cli("creds", "list", "--home", str(home)).output
    assert "triage" in table and "active" in table


def test_bad_requests_are_one_line_errors(home: Path, tmp_path: Path) -> None:
    result = cli("creds", "issue", "--role", "wizard", "--out", str(tmp_path / "x.creds"), "--home", str(home))
    assert result.exit_code == 2 and "unknown role 'wizard'" in result.output
    result = cli("creds", "issue", "--role", "viewer", "--out", str(tmp_path / "x.creds"), "--home", str(home))
    assert result.exit_code == 1 and "needs a tenant" in result.output and not (tmp_path / "x.creds").exists()
    result = cli("creds", "list", "--home", str(tmp_path / "nowhere"))
    assert result.exit_code == 1 and "is not an identity home" in result.output
    result = cli("creds", "revoke", "nobody", "--home", str(home))
    assert result.exit_code == 1 and "no credential named 'nobody'" in result.output
    with pytest.raises(Exception, match="neither a duration"):
        parse_expiry("soon")
    assert parse_expiry("12h") == timedelta(hours=12)
    assert parse_expiry("2030-01-02") == datetime(2030, 1, 2, tzinfo=UTC)


def test_revoke_records_it_and_says_when_no_server_was_told(home: Path, tmp_path: Path) -> None:
    assert cli("creds", "issue", "--role", "viewer", "--tenant", "acme", "--name", "bob",
               "--out", str(tmp_path / "bob.creds"), "--home", str(home)).exit_code == 0
    result = cli("creds", "revoke", "bob", "--home", str(home), "--nats", "nats://127.0.0.1:1")
    assert result.exit_code == 1
    assert "revoked viewer credential 'bob'" in result.output
    assert "but the server at nats://127.0.0.1:1 (from argument) was not told" in result.output
    assert [u.revoked_at is not None for u in IdentityHome(home).list()] == [True]


def test_every_creds_command_has_help() -> None:
    for command in ("issue", "list", "revoke"):
        result = cli("creds", command, "--help")
        assert result.exit_code == 0 and "--home" in result.output
    assert "admin credential" in cli("provision", "--help").output
