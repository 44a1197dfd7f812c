"""Auth on by default: the servers the tests and `interlock up` start refuse anonymous connections,
every process connects with its own credential, and `interlock creds revoke` cuts a user off
within seconds on the running server."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from interlock.cli._app import app
from interlock.client import Client, Unavailable
from interlock.devstack.stack import Stack
from interlock.identity import IdentityHome, PermissionDenied, read_creds
from interlock.runtime.connect import ConnectRefused, connect
from interlock.worker import JobContext, Worker
from tests.principals import Principals

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def assert_anonymous_refused(url: str) -> None:
    with pytest.raises(ConnectRefused) as info:
        await connect(url, patient=True)  # a patient client is refused at once, not retried for ever
    message = str(info.value)
    assert message.startswith(f"an anonymous connection (no creds given) may not connect to {url}: the server "
                              "refused the connection's credentials")
    assert "INTERLOCK_CREDS" in message and "\n" not in message


async def test_the_test_server_refuses_anonymous_connections_and_accepts_admin(provisioned: str,
                                                                                admin_creds: Path) -> None:
    await assert_anonymous_refused(provisioned)
    nc = await connect(provisioned, creds=admin_creds, patient=False)
    try:
        assert (await nc.jetstream().account_info()).streams >= 1
    finally:
        await nc.close()


async def test_a_credential_from_another_identity_home_is_refused_naming_it(provisioned: str,
                                                                            tmp_path: Path) -> None:
    stranger = IdentityHome(tmp_path / "other").issue("admin", "default", name="stranger")
    with pytest.raises(ConnectRefused, match=rf"^credential {stranger} may not connect to {provisioned}: "):
        await connect(provisioned, creds=stranger)


async def test_interlock_up_runs_auth_on_and_a_second_start_reuses_the_credentials(tmp_path: Path) -> None:
    home = tmp_path / "home"
    stack = Stack(home=home, port=0, services=("auditor",),
                  env={"INTERLOCK_AUDITOR_DB": str(tmp_path / "auditor.sqlite3")})
    try:
        url = await asyncio.to_thread(stack.start_nats)
        await assert_anonymous_refused(url)
        assert stack.admin_creds == home / "identity" / "creds" / "admin.creds"
        assert any(line.startswith("stream IL_EVENTS") for line in await stack.provision())
        stack.start()
        # the service connects with its own credential (it may not provision: the stack did)
        log = stack.procs["auditor"].log_path
        deadline = time.monotonic() + 30
        while "auditor started" not in (log.read_text() if log.exists() else ""):
            assert stack.procs["auditor"].alive(), log.read_text()
            assert time.monotonic() < deadline, f"auditor did not start: {log.read_text()}"
            await asyncio.sleep(0.1)
    finally:
        await asyncio.to_thread(stack.stop)
    keys = {name: read_creds(path)[1].public_key for name, path in stack.creds.items()}
    assert set(keys) == {"admin", "auditor"}
    again = Stack(home=home, port=0, services=("auditor",))
    try:
        url = await asyncio.to_thread(again.start_nats)
        assert {name: read_creds(path)[1].public_key for name, path in again.creds.items()} == keys
        await assert_anonymous_refused(url)
        nc = await connect(url, creds=again.admin_creds, patient=False)
        await nc.close()
    finally:
        await asyncio.to_thread(again.stop)


async def test_creds_revoke_cuts_a_connected_user_off_within_seconds(provisioned: str, principals: Principals,
                                                                     tmp_path: Path) -> None:
    creds = principals.home.issue("viewer", "default", name="revoked-viewer", out=tmp_path / "v.creds")
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    nc = await connect(provisioned, creds=creds, patient=False, closed_cb=on_closed, allow_reconnect=False)
    result = await asyncio.to_thread(CliRunner().invoke, app, ["creds", "revoke", "revoked-viewer", "--home",
                                                               str(principals.home.root), "--nats", provisioned])
    assert result.exit_code == 0, result.output
    assert "revoked viewer credential 'revoked-viewer'" in result.output and f"pushed to {provisioned}" in result.output
    await asyncio.wait_for(closed.wait(), 5)  # no restart: the running server closed the connection
    assert "revoked" in str(nc.last_error).lower()
    with pytest.raises(ConnectRefused, match=r"revoked|refused the connection's credentials"):
        await connect(provisioned, creds=creds, patient=False)


async def test_the_client_and_cli_say_which_credential_was_refused(provisioned: str, admin_creds: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .interlock/identity/creds/admin.creds here: no default credential
    monkeypatch.delenv("INTERLOCK_CREDS", raising=False)
    with pytest.raises(Unavailable, match=rf"^an anonymous connection \(no creds given\) may not connect to "
                                          rf"{provisioned}: the server refused"):
        await Client.connect(provisioned)
    result = await asyncio.to_thread(CliRunner().invoke, app, ["run", "list", "--nats", provisioned])
    assert result.exit_code == 1 and result.stderr.startswith("interlock: an anonymous connection")
    assert len(result.stderr.splitlines()) == 1
    # the default: the admin credential `interlock up` wrote, when it is there
    default = tmp_path / ".interlock" / "identity" / "creds" / "admin.creds"
    default.parent.mkdir(parents=True)
    await asyncio.to_thread(shutil.copyfile, admin_creds, default)
    async with await Client.connect(provisioned) as client:
        assert (client.creds, client.creds_source, client.principal) == (default.relative_to(tmp_path), "default",
                                                                          "admin-default")


async def test_interlock_provision_needs_the_admin_credential(provisioned: str, admin_creds: Path,
                                                              principals: Principals) -> None:
    viewer = principals.person("viewer")

    def provision_as(creds: Path) -> Result:
        return CliRunner().invoke(app, ["provision", "--nats", provisioned, "--creds", str(creds)])

    refused = await asyncio.to_thread(provision_as, viewer)
    assert refused.exit_code == 1
    assert refused.stderr.startswith(f"interlock: viewer-default ({viewer}) may not provision: the credential lacks "
                                     "permission to publish to '$JS.API.STREAM.CREATE.IL_EVENTS'")
    done = await asyncio.to_thread(provision_as, admin_creds)
    assert done.exit_code == 0, done.output
    assert "stream IL_EVENTS (il.evt.>): ok" in done.stdout


async def test_a_worker_whose_credential_lacks_a_topic_is_refused_at_once(provisioned: str,
                                                                          principals: Principals) -> None:
    creds = principals.worker(["auth.one"], "default")
    worker = Worker("narrow", nats_url=provisioned, tenant="default", creds=creds)

    @worker.job("auth.one")
    async def one(ctx: JobContext) -> None:
        return None

    @worker.job("auth.two")
    async def two(ctx: JobContext) -> None:
        return None

    started = time.monotonic()
    with pytest.raises(PermissionDenied, match=rf"^worker narrow \({creds}\) may not pull tenant default's jobs "
                                               r"of topic 'auth.two': the credential lacks permission to publish"):
        await worker.start()
    assert time.monotonic() - started < 1  # not after the server dropped a request and a timeout
    # the topic it was issued for: it starts and serves
    allowed = Worker("narrow", nats_url=provisioned, tenant="default", creds=creds)
    allowed.job("auth.one")(one)
    await allowed.start()
    await allowed.stop()
