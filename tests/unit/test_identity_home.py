"""The identity home: files and modes, issue, list, revoke, server config (no server)."""

from __future__ import annotations

import json
import logging
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import nats.errors
import pytest

from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.identity import (
    ALL_TENANTS,
    APP_ACCOUNT,
    SYSTEM_ACCOUNT,
    IdentityError,
    IdentityHome,
    RoleError,
    creds_inbox_prefix,
    creds_permissions,
    decode_jwt,
    describe_permission_error,
    permission_error,
    read_creds,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_use_creates_operator_accounts_and_system_user_with_private_modes(tmp_path: Path) -> None:
    home = IdentityHome(tmp_path / "identity")
    root = home.root
    assert mode(root) == 0o700 and mode(root / "accounts") == 0o700
    seeds = [root / "operator.nk", *sorted((root / "accounts").glob("*.nk")), home.system_creds]
    assert len(seeds) == 1 + 2 * 2 + 1  # operator; identity + signing key of SYS and INTERLOCK; system user
    assert all(mode(f) == 0o600 for f in seeds)
    operator = decode_jwt(home.operator_jwt, expect="operator")
    assert operator["nats"]["system_account"] == home.account_public_key(SYSTEM_ACCOUNT)
    jwts = home.account_jwts()
    assert set(jwts) == {home.account_public_key(SYSTEM_ACCOUNT), home.account_public_key(APP_ACCOUNT)}
    for token in jwts.values():
        assert decode_jwt(token, expect="account")["iss"] == operator["sub"]
    system_jwt, _ = read_creds(home.system_creds)
    assert decode_jwt(system_jwt)["nats"]["issuer_account"] == home.account_public_key(SYSTEM_ACCOUNT)


def test_reopening_a_home_keeps_its_keys(tmp_path: Path) -> None:
    first = IdentityHome(tmp_path)
    second = IdentityHome(tmp_path)
    assert first.account_jwts().keys() == second.account_jwts().keys()
    assert first.operator_key.public_key == second.operator_key.public_key


def test_issue_writes_creds_signed_by_the_account_signing_key(tmp_path: Path) -> None:
    home = IdentityHome(tmp_path / "identity")
    out = tmp_path / "elsewhere" / "w.creds"
    path = home.issue("worker", "acme", ["llm.summarize"], name="w1", expires=timedelta(hours=1), out=out)
    assert path == out and mode(path) == 0o600
    token, key = read_creds(path)
    claims = decode_jwt(token, expect="user")
    assert claims["sub"] == key.public_key and claims["name"] == "w1"
    assert claims["nats"]["issuer_account"] == home.account_public_key(APP_ACCOUNT)
    assert claims["iss"] != home.account_public_key(APP_ACCOUNT)  # a signing key, not the account's own
    assert 3500 < claims["exp"] - time.time() <= 3600
    assert f"{p.inbox_prefix(key.public_key)}.>" in claims["nats"]["sub"]["allow"]
    [principal] = home.list()
    assert (principal.name, principal.role, principal.tenant, principal.topics) == ("w1", "worker", "acme",
                                                                                   ("llm.summarize",))
    assert principal.public_key == key.public_key and principal.active
    assert principal.inbox_prefix == p.inbox_prefix(key.public_key) == creds_inbox_prefix(path)
    held = creds_permissions(path)
    assert held.allows_publish(s.result("acme", "run-1")) and not held.allows_publish(s.result("globex", "run-1"))
    default = home.issue("viewer", "acme")
    assert default == home.root / "creds" / "viewer-acme.creds"
    assert home.issue("planner") == home.root / "creds" / "planner.creds"
    assert home.principal("planner").tenant == ALL_TENANTS


def test_issue_refuses_bad_requests_before_writing_anything(tmp_path: Path) -> None:
    home = IdentityHome(tmp_path)
    with pytest.raises(RoleError, match="unknown role"):
        home.issue("root", "acme")
    with pytest.raises(RoleError, match="at least one topic"):
        home.issue("worker", "acme")
    with pytest.raises(RoleError, match="needs a tenant"):
        home.issue("viewer")
    with pytest.raises(IdentityError, match="expires must be in the future"):
        home.issue("viewer", "acme", expires=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="principal name 'a b' is not a valid subject token"):
        home.issue("viewer", "acme", name="a b")
    assert home.list() == []
    home.issue("approver", "acme", name="alice")
    with pytest.raises(IdentityError, match="an active credential named 'alice' exists for tenant acme"):
        home.issue("approver", "acme", name="alice")
    home.issue("approver", "globex", name="alice")  # a name within its tenant
    with pytest.raises(IdentityError, match="'alice' is active in several tenants"):
        home.revoke("alice")
    assert home.revoke("alice", "globex").tenant == "globex"


def test_revoke_records_the_user_in_the_account_jwt(tmp_path: Path) -> None:
    home = IdentityHome(tmp_path)
    home.issue("viewer", "acme", name="bob")
    bob = home.principal("bob")
    token, _ = read_creds(Path(bob.creds or ""))
    revoked = home.revoke("bob")
    assert revoked.revoked_at is not None and not revoked.active
    account = decode_jwt(home.account_jwts()[home.account_public_key(APP_ACCOUNT)], expect="account")
    # the server refuses a user JWT issued at or before the revocation time
    assert account["nats"]["revocations"][bob.public_key] >= decode_jwt(token)["iat"]
    assert [u.revoked_at is not None for u in home.list()] == [True]
    home.issue("viewer", "acme", name="bob")  # the name is free again
    assert home.principal("bob").active and home.principal("bob").public_key != bob.public_key
    with pytest.raises(IdentityError, match="no credential named 'carol'"):
        home.revoke("carol")


def test_server_config_is_operator_mode_with_a_run_time_resolver(tmp_path: Path) -> None:
    home = IdentityHome(tmp_path)
    config = home.server_config()
    assert Path(config["operator"]).read_text() == home.operator_jwt
    assert config["system_account"] == home.account_public_key(SYSTEM_ACCOUNT)
    assert config["resolver"]["type"] == "full" and Path(config["resolver"]["dir"]).is_dir()
    assert config["resolver_preload"] == home.account_jwts()
    assert config["max_control_line"] >= 16 * 1024
    written = home.write_server_config(tmp_path / "nats.conf", port=4222)
    assert json.loads(written.read_text()) == {**config, "port": 4222} and mode(written) == 0o600


def test_a_home_used_from_several_threads_loses_no_credential(tmp_path: Path) -> None:
    home = IdentityHome(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: home.issue("worker", "acme", ["t"], name=f"w{i}"), range(8)))
        list(pool.map(lambda i: home.revoke(f"w{i}"), range(0, 8, 2)))  # read-modify-write of one account
    account = decode_jwt(home.account_jwts()[home.account_public_key(APP_ACCOUNT)])
    assert len(account["nats"]["revocations"]) == 4 and len(home.list()) == 8


def test_seeds_never_reach_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    home = IdentityHome(tmp_path)
    home.issue("admin", "acme", name="root")
    home.revoke("root")
    seeds = [f.read_bytes().strip().decode() for f in (tmp_path / "accounts").glob("*.nk")]
    seeds += [read_creds(Path(home.principal("root").creds or ""))[1].seed.decode()]
    assert caplog.records and not any(seed in record.getMessage() for seed in seeds for record in caplog.records)


def test_permission_errors_are_one_clear_line() -> None:
    subject = s.run_events("acme", "Run-1")
    lowered = nats.errors.Error(f'nats: permissions violation for publish to "{subject.lower()}"')
    message = describe_permission_error(lowered, principal="w1", action="append an event", subject=subject)
    assert message == f"w1 may not append an event: the credential lacks permission to publish to {subject!r}"
    error = permission_error(lowered, principal="w1", action="append an event", subject=subject)
    assert error is not None and str(error) == message and error.principal == "w1"
    sub = nats.errors.Error(f'nats: permissions violation for subscription to "{subject.lower()}"')
    assert "permission to subscribe to" in (describe_permission_error(sub, principal="w1", action="watch") or "")
    assert describe_permission_error(nats.errors.AuthorizationError(), principal="x", action="connect") is not None
    timeout = describe_permission_error(nats.errors.TimeoutError(), principal="v", action="delete a stream",
                                        subject=p.js_stream("DELETE", s.EVENTS_STREAM))
    assert timeout is not None and "missing permission to publish" in timeout
    assert describe_permission_error(ValueError("other"), principal="x", action="y") is None


def test_get_or_issue_reuses_a_fitting_credential_and_replaces_one_that_no_longer_fits(tmp_path: Path) -> None:
    home = IdentityHome(tmp_path / "identity")
    first = home.get_or_issue("worker", "acme", ["triage"], name="worker-0")
    key = read_creds(first)[1].public_key
    # a second `interlock up` on the same home: the same credential, not a new one
    again = IdentityHome(tmp_path / "identity").get_or_issue("worker", "acme", ["triage"], name="worker-0")
    assert again == first and read_creds(again)[1].public_key == key
    assert [u.name for u in home.list()] == ["worker-0"]
    # the worker now serves another topic: the old credential is revoked, a new one issued
    moved = home.get_or_issue("worker", "acme", ["triage", "fix"], name="worker-0")
    assert read_creds(moved)[1].public_key != key
    new_key = read_creds(moved)[1].public_key
    by_key = {u.public_key: u for u in home.list()}
    old, new = by_key[key], by_key[new_key]
    assert (len(by_key), old.revoked_at is not None, new.topics, new.active) == (2, True, ("triage", "fix"), True)
    assert key in decode_jwt(home.account_jwts()[home.account_public_key()], expect="account")["nats"]["revocations"]
    # a deleted creds file is issued again
    moved.unlink()
    assert home.get_or_issue("worker", "acme", ["triage", "fix"], name="worker-0").is_file()


def test_server_config_takes_a_resolver_dir_per_cluster_node(tmp_path: Path) -> None:
    home = IdentityHome(tmp_path / "identity")
    config = home.server_config(tmp_path / "n1" / "resolver")
    assert config["resolver"]["dir"] == str(tmp_path / "n1" / "resolver")
    assert (tmp_path / "n1" / "resolver").is_dir()
