"""The api service for integration tests: real uvicorn on port 0 in the test's event loop, its
client connected with the ``api`` service credential, in front of the harness's services and an
auditor; keys created through the client (as `interlock apikeys create` does)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from interlock.api.server import ApiServer
from interlock.api.settings import ApiSettings
from interlock.auditor.service import AuditorService
from interlock.client import Client
from tests.integration.harness import Harness
from tests.principals import Principals


@dataclass
class Api:
    url: str
    client: Client
    """The api service's own client (the ``api`` credential)."""
    admin: Client
    """An admin's client (keys, approvers)."""
    keys: dict[str, str] = field(default_factory=dict)

    async def key(self, role: str, tenant: str = "default", principal: str | None = None) -> str:
        """A key of ``role`` in ``tenant`` (one per role, tenant and principal, created on first use)."""
        name = f"{role}/{tenant}/{principal or ''}"
        if name not in self.keys:
            _, self.keys[name] = await self.admin.with_tenant(tenant).create_api_key(role, principal=principal,
                                                                                     by="test")
        return self.keys[name]

    def http(self, key: str | None = None, **headers: str) -> httpx.AsyncClient:
        given = {"X-API-Key": key} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers={**given, **headers}, timeout=15.0)


@pytest.fixture
async def api(harness: Harness, auditor: AuditorService, principals: Principals, tmp_path: Path
              ) -> AsyncIterator[Api]:
    client = await Client.connect(harness.url, creds=principals.service("api"), name="interlock-api-test")
    admin = await Client.connect(harness.url, creds=principals.admin(), name="api-test-admin")
    server = ApiServer(ApiSettings(port=0, session_secret_file=tmp_path / "session.secret",
                                   max_body_bytes=64 * 1024), client=client)
    url = await server.start()
    try:
        yield Api(url=url, client=client, admin=admin)
    finally:
        await server.stop()
        await client.close()
        await admin.close()
