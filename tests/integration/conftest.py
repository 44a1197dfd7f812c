from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

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
