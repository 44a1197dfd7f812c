"""Shared fixtures: one throwaway nats-server per test session (port 0, temporary store)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from interlock.core.natsserver import EmbeddedNats
from interlock.core.topology import provision


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    store = tmp_path_factory.mktemp("nats-store")
    server = EmbeddedNats(store_dir=store, port=0, log_file=store / "nats.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
async def provisioned(nats_url: str) -> str:
    nc = await nats.connect(nats_url)
    await provision(nc.jetstream())
    await nc.close()
    return nats_url


@pytest.fixture
async def nc(provisioned: str) -> AsyncIterator[NATS]:
    client = await nats.connect(provisioned)
    yield client
    await client.close()


@pytest.fixture
def examples_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "examples"
