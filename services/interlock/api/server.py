"""Running the api service: uvicorn serving :func:`interlock.api.app.create_app` (``interlock serve api``),
and :class:`ApiServer`, the same in the current event loop (tests, benchmarks; port 0: any free one)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn

from interlock.api.app import create_app
from interlock.api.settings import ApiSettings
from interlock.client import Client

log = logging.getLogger(__name__)


class ApiServer:
    """uvicorn in this event loop: ``await start()`` returns the base URL once it listens."""

    def __init__(self, settings: ApiSettings | None = None, *, client: Client | None = None) -> None:
        self.settings = settings or ApiSettings.load()
        self.app = create_app(self.settings, client=client)
        config = uvicorn.Config(self.app, host=self.settings.host, port=self.settings.port, lifespan="on",
                                log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self, timeout: float = 30.0) -> str:
        self._task = asyncio.create_task(self.server.serve())
        async with asyncio.timeout(timeout):
            while not self.server.started:
                if self._task.done():
                    self._task.result()  # raises why it stopped
                    raise RuntimeError("the api server stopped before it listened")
                await asyncio.sleep(0.02)
        sockets = [sock for server in self.server.servers for sock in server.sockets]
        host, port = sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def wait(self) -> None:
        """Until the server stops (uvicorn stops on SIGINT and SIGTERM)."""
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class ApiService:
    """``interlock serve api``: one copy of the api service until SIGINT or SIGTERM."""

    name = "api"

    def __init__(self, settings: object | None = None) -> None:
        # ``settings``: the CLI passes ServiceSettings for --nats/--creds; the client reads INTERLOCK_* itself
        nats_url = getattr(settings, "nats_url", None)
        creds = getattr(settings, "creds", None)
        self._nats_url = nats_url if isinstance(nats_url, str) else None
        self._creds = creds

    async def run_forever(self) -> None:
        settings = ApiSettings.load()
        client = await Client.connect(self._nats_url, creds=self._creds, name="interlock-api", patient=True)
        server = ApiServer(settings, client=client)
        try:
            url = await server.start()
            log.info("api: listening on %s (NATS %s)", url, client.url)
            await server.wait()
        finally:
            await server.stop()
            await client.close()
