from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from interlock.auditor.service import AuditorService
from interlock.runtime.service import ServiceSettings
from tests.integration.api_fixtures import api  # noqa: F401 - the api service fixture (test_api*, bench)
from tests.integration.harness import Harness, connect
from tests.principals import Principals


@pytest.fixture
async def harness(provisioned: str, admin_creds: Path, principals: Principals) -> AsyncIterator[Harness]:
    nc = await connect(provisioned, admin_creds)
    h = Harness(url=provisioned, nc=nc, principals=principals)
    await h.start_services()
    try:
        yield h
    finally:
        await h.stop()
        await nc.close()


@pytest.fixture
async def auditor(provisioned: str, tmp_path: Path, principals: Principals) -> AsyncIterator[AuditorService]:
    service = AuditorService(ServiceSettings(nats_url=provisioned, provision=False, sweep_interval=0,
                                             creds=principals.service("auditor")),
                             db_path=tmp_path / "auditor.sqlite3")
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def two_copies(provisioned: str, admin_creds: Path, principals: Principals) -> AsyncIterator[Harness]:
    """Two copies of every service on the session's server (scale-out, schedules, workload)."""
    nc = await connect(provisioned, admin_creds)
    h = Harness(url=provisioned, nc=nc, principals=principals)
    await h.start_services(copies=2)
    try:
        yield h
    finally:
        await h.stop()
        await nc.close()


@pytest.fixture
async def bare(provisioned: str, admin_creds: Path, principals: Principals) -> AsyncIterator[Harness]:
    """A harness whose test starts the services itself (with its own settings)."""
    nc = await connect(provisioned, admin_creds)
    h = Harness(url=provisioned, nc=nc, principals=principals)
    try:
        yield h
    finally:
        await h.stop()
        await nc.close()
