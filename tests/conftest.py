"""Shared fixtures: one throwaway nats-server per test session (port 0, temporary store), in
operator mode with a temporary identity home: every connection needs a credential, and an
anonymous one is refused. Provisioned with the admin credential."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from interlock.core.natsserver import EmbeddedNats
from interlock.core.topology import provision
from interlock.identity import IdentityHome
from interlock.runtime.connect import connect
from tests.principals import Principals

# clients the tests connect to a running server: a loaded CI machine may take more than the
# 1.2 s a person waits (tests of that default clear it)
os.environ.setdefault("INTERLOCK_CONNECT_TIMEOUT", "10")

TASK_DUMP_BEFORE_TIMEOUT_S = 15.0


@pytest.fixture(autouse=True)
def dump_tasks_before_a_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test about to hit pytest-timeout prints what every pending asyncio task awaits, so a hang
    in CI names its cause (pytest-timeout shows threads, and all the tests share one loop)."""
    limit = float(request.config.getini("timeout") or 0)
    marker = request.node.get_closest_marker("timeout")
    if marker and marker.args:
        limit = float(marker.args[0])
    if limit <= TASK_DUMP_BEFORE_TIMEOUT_S:
        yield
        return
    timer = threading.Timer(limit - TASK_DUMP_BEFORE_TIMEOUT_S, _dump_tasks, args=(request.node.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _dump_tasks(nodeid: str) -> None:
    out = sys.__stderr__ or sys.stderr
    # read from another thread while the loop runs: best effort, which is enough for a diagnosis
    tasks: list[asyncio.Task[object]] = []
    for _ in range(3):
        try:
            tasks = [task for task in list(asyncio.tasks._all_tasks) if not task.done()]  # type: ignore[attr-defined]
            break
        except RuntimeError:  # the loop changed the set while it was copied
            continue
    print(f"\n=== {nodeid} is near its timeout: {len(tasks)} pending asyncio tasks ===", file=out)
    for task in tasks:
        try:
            print(f"--- {task.get_name()}: {task.get_coro()!r}", file=out)
            task.print_stack(limit=8, file=out)
        except Exception as e:  # the loop changed the task under us
            print(f"    (stack unavailable: {e})", file=out)
    out.flush()


@pytest.fixture(scope="session", autouse=True)
def data_keys_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tenants' data keys of every in-process client, service and worker of the session (never
    the checkout's .interlock/data-keys.json); a test's own stack sets its own."""
    path = tmp_path_factory.mktemp("data-keys") / "data-keys.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERLOCK_DATA_KEYS_FILE", str(path))
        yield path


@pytest.fixture(scope="session")
def identity_home(tmp_path_factory: pytest.TempPathFactory) -> IdentityHome:
    return IdentityHome(tmp_path_factory.mktemp("identity"))


@pytest.fixture(scope="session")
def principals(identity_home: IdentityHome) -> Principals:
    return Principals(identity_home)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory, identity_home: IdentityHome) -> Iterator[EmbeddedNats]:
    store = tmp_path_factory.mktemp("nats-store")
    server = EmbeddedNats(store_dir=store, port=0, log_file=store / "nats.log", config=identity_home.server_config())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def admin_creds(principals: Principals) -> Path:
    return principals.admin()


@pytest.fixture(scope="session")
async def provisioned(nats_url: str, admin_creds: Path, principals: Principals) -> str:
    nc = await connect(nats_url, creds=admin_creds, patient=False)
    await provision(nc.jetstream())
    for name in ("planner", "policy", "approval", "dispatcher", "auditor"):
        principals.service(name)
    await principals.home.publish_keyring(nc.jetstream())  # as `interlock up` and `provision` do
    await nc.close()
    principals.publish_to = (nats_url, admin_creds)
    return nats_url


@pytest.fixture
async def nc(provisioned: str, admin_creds: Path) -> AsyncIterator[NATS]:
    client = await connect(provisioned, creds=admin_creds, patient=False)
    yield client
    await client.close()


@pytest.fixture
async def service_nc(provisioned: str, principals: Principals) -> AsyncIterator[NATS]:
    """A service's connection (the planner's credential), for tests that append to run logs
    themselves: only services may."""
    client = await connect(provisioned, creds=principals.service("planner"), patient=False)
    yield client
    await client.close()


@pytest.fixture
def examples_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "examples"
