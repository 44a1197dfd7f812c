"""Processes that take a message and hold it until they are SIGKILLed (tests/integration/test_stall_bounds.py).

``python -m tests.integration.holders worker TOPIC MARKER``: a worker (the SDK, settings from
``INTERLOCK_*``) whose handler, the first time any copy gets the job, writes its pid to MARKER and
then works forever; a copy that gets the job when MARKER exists returns ``{"by": pid}``.

``python -m tests.integration.holders service STREAM DURABLE SUBJECT MARKER``: a service (the
runtime's ``Service``, as the planner's credential) with one durable consumer whose handler writes
its pid to MARKER and then works forever on the message.

Each prints ``ready`` once it consumes.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg

from interlock.runtime.service import Service, ServiceSettings
from interlock.worker import JobContext, Worker


def claim(marker: Path) -> bool:
    """Write our pid to ``marker``; False when another holder took the work first."""
    if marker.exists():
        return False
    marker.write_text(str(os.getpid()))
    return True


async def serve_worker(topic: str, marker: Path) -> None:
    worker = Worker("holder")

    @worker.job(topic)
    async def hold(ctx: JobContext) -> Any:
        if not claim(marker):
            return {"by": os.getpid(), "attempt": ctx.attempt}
        await asyncio.Event().wait()  # works on it until killed

    await worker.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


class Holder(Service):
    name = "planner"  # its credential may consume the run-path streams

    def __init__(self, settings: ServiceSettings, stream: str, durable: str, subject: str, marker: Path) -> None:
        super().__init__(settings)
        self.where = (stream, durable, subject)
        self.marker = marker

    def register(self, broker: NatsBroker) -> None:
        stream, durable, subject = self.where
        self.pull(broker, subject, stream, durable, self.hold)

    async def hold(self, msg: Msg) -> None:
        claim(self.marker)
        await asyncio.Event().wait()


async def serve_service(stream: str, durable: str, subject: str, marker: Path) -> None:
    service = Holder(ServiceSettings(sweep_interval=0), stream, durable, subject, marker)
    await service.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    kind, *args = argv
    if kind == "worker":
        asyncio.run(serve_worker(args[0], Path(args[1])))
    elif kind == "service":
        asyncio.run(serve_service(args[0], args[1], args[2], Path(args[3])))
    else:
        raise SystemExit(f"holders: unknown kind {kind!r} (worker or service)")


if __name__ == "__main__":
    main(sys.argv[1:])
