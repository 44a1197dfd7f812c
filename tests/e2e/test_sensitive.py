"""Sensitive values on the example stack (real nats-server with auth, services and workers as
processes): the agents get them in clear, nothing stores them in clear (scan the bytes of every
stream, bucket and object, the auditor's SQLite files and every log), verification needs no key,
and forgetting the tenant makes them unreadable while every chain still verifies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from interlock.client import Client, ClientError
from interlock.contracts import events as ev
from interlock.core.sealed import REDACTED, SEALED, contains_sealed
from interlock.devstack.stack import Stack
from interlock.runtime.datakeys import FILE_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

HERE = Path(__file__).resolve().parent
WORKFLOW = """
id: secrets
version: 1
sensitive: [input.credentials.api_key, steps.fetch.output.session]
steps:
  fetch:
    topic: secret.fetch
    input: {api_key: "{{ input.credentials.api_key }}", password: "{{ input.password }}", user: "{{ input.user }}"}
  use:
    topic: secret.use
    depends_on: [fetch]
    input:
      session: "{{ steps.fetch.output.session }}"
      token: "{{ steps.fetch.output.token }}"
      count: "{{ steps.fetch.output.count }}"
  tell: {type: notify, depends_on: [use], channel: ops, message: "done for {{ input.user }}"}
"""
SECRETS = {name: f"{name.lower()}-{uuid.uuid4().hex}" for name in ("API_KEY", "PASSWORD", "TOKEN", "SESSION")}


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.delenv(FILE_ENV)  # the stack keeps its own keyring under its home
    stack = Stack(home=tmp_path / "home", port=0, workers=[f"{HERE / 'secret_agents.py'}:worker"],
                  env={"INTERLOCK_AUDITOR_DB": str(tmp_path / "auditor.sqlite3"),
                       **{f"E2E_{name}": value for name, value in SECRETS.items()}})
    stack.start_nats()
    asyncio.run(stack.provision())
    stack.start()
    monkeypatch.setenv(FILE_ENV, str(stack.data_keys_file))  # this test's client: the stack's keys
    try:
        yield stack
    finally:
        stack.stop()


def _files(stack: Stack, tmp_path: Path) -> list[Path]:
    """Every file that holds what the stack stored or logged: the JetStream store (streams, KV
    buckets, the object store), the auditor's SQLite files (WAL too) and the process logs."""
    roots = [stack.home / "nats", stack.home / "logs"]
    files = [f for root in roots for f in root.rglob("*") if f.is_file()]
    return files + sorted(tmp_path.glob("auditor.sqlite3*"))


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "interlock.cli", *args, "--keys-file", str(stack.data_keys_file)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_sensitive_values_are_stored_sealed_and_forgetting_the_tenant_shreds_them(
        stack: Stack, tmp_path: Path) -> None:
    assert stack.data_keys_file == stack.home / "data-keys.json"
    assert stack.data_keys_file.stat().st_mode & 0o777 == 0o600

    async def run_once(client: Client) -> str:
        run_id = await client.start_run("secrets", {"credentials": {"api_key": SECRETS["API_KEY"]},
                                                    "password": SECRETS["PASSWORD"], "user": "alice"})
        final = await client.wait(run_id, timeout=60)
        events = await client.events(run_id)
        failures = [e["data"] for e in events if e["type"] == ev.StepFailed.type_name]
        assert final == ev.RunSucceeded.type_name, failures  # the agents assert the clear values
        await client.wait_projected(run_id)
        return run_id

    async def scenario() -> str:
        client = await Client.connect(stack.url, tenant="default", name="e2e", creds=stack.admin_creds)
        try:
            await client.apply_workflow(WORKFLOW)
            first = await run_once(client)
            events = await client.events(first)
            started = events[0]["data"]
            assert started["input"]["credentials"]["api_key"][SEALED]["run"] == first
            assert contains_sealed(started["input"]["password"]) and started["input"]["user"] == "alice"
            output = next(e["data"]["output"] for e in events if e["type"] == ev.StepSucceeded.type_name
                          and e["step_id"] == "fetch")
            assert set(output) == {"token", "session", "count"} and output["count"] == 3
            assert contains_sealed(output["token"]) and contains_sealed(output["session"])
            assert client.unseal(output) == {"token": SECRETS["TOKEN"], "session": SECRETS["SESSION"], "count": 3}
            # people see the marker: the auditor's status and timeline
            status = await client.status(first)
            fetch = next(st for st in status["steps"] if st["step_id"] == "fetch")
            assert fetch["output"] == {"token": REDACTED, "session": REDACTED, "count": 3}
            assert (await client.verify(first)).ok

            rotated = _cli(stack, "tenant", "keys", "rotate", "default")
            assert rotated.returncode == 0, rotated.stderr
            second = await run_once(client)
            new_kid = (await client.events(second))[0]["data"]["input"]["password"][SEALED]["kid"]
            assert new_kid in rotated.stdout and new_kid != started["input"]["password"][SEALED]["kid"]
            assert client.unseal(started["input"])["password"] == SECRETS["PASSWORD"]  # old keys still read

            return_plan = await client.rerun_plan(first, "use")
            forgotten = _cli(stack, "tenant", "forget", "default", "--yes")
            assert forgotten.returncode == 0 and "destroyed 2 data key(s)" in forgotten.stdout, forgotten
            for run_id in (first, second):
                report = await client.verify(run_id)
                assert report.ok, report.problems  # hashes cover the ciphertext: no key needed
            with pytest.raises(ClientError, match="data key destroyed"):
                client.unseal(started["input"])
            # an agent asked to use a shredded value gets a clear reason, and so does the run's log
            rerun = await client.rerun(return_plan)
            assert await client.wait(rerun, timeout=60) == ev.RunFailed.type_name
            failed = [e["data"]["error"]["message"] for e in await client.events(rerun)
                      if e["type"] == ev.StepFailed.type_name]
            assert any("data key destroyed" in message for message in failed), failed
            with pytest.raises(ClientError, match="was forgotten"):
                await client.start_run("secrets", {"password": "new-one"})
            return first
        finally:
            await client.close()

    first = asyncio.run(scenario())
    stack.stop()  # flush the logs and the store before scanning them
    files = _files(stack, tmp_path)
    assert any(f.name.endswith(".blk") for f in files), "the scan must cover the JetStream store"
    blobs = {f: f.read_bytes() for f in files}
    # the scan can see payloads: the non-sensitive user name is in the store and the projection
    assert any(b"alice" in data for f, data in blobs.items() if "nats" in f.parts)
    assert any(b"alice" in data for f, data in blobs.items() if f.name.startswith("auditor"))
    leaks = [(name, str(f)) for name, value in SECRETS.items() for f, data in blobs.items()
             if value.encode() in data]
    assert leaks == [], f"sensitive values stored in clear: {leaks}"
    # the auditor's timeline shows the marker, after the forget as before it
    with contextlib.closing(sqlite3.connect(tmp_path / "auditor.sqlite3")) as db:
        (data,) = db.execute("SELECT data FROM timeline WHERE run_id = ? AND seq = 1", (first,)).fetchone()
    started = json.loads(data)
    assert started["input"]["credentials"]["api_key"] == started["input"]["password"] == REDACTED
