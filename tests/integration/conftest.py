from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.harness import Harness, connect


@pytest.fixture
async def harness(provisioned: str) -> AsyncIterator[Harness]:
    nc = await connect(provisioned)
    h = Harness(url=provisioned, nc=nc)
    await h.start_services()
    try:
        yield h
    finally:
        await h.stop()
        await nc.close()
