"""Connecting to NATS the same way everywhere: services, workers, the CLI and tests."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"


URL_FILE = Path(".interlock") / "nats.url"  # written by `interlock up` for the other commands


def resolve_url(url: str | None = None) -> str:
    """An explicit URL, else INTERLOCK_NATS_URL, else the one `interlock up` wrote, else the default."""
    if url:
        return url
    if os.environ.get("INTERLOCK_NATS_URL"):
        return os.environ["INTERLOCK_NATS_URL"]
    if URL_FILE.exists():
        return URL_FILE.read_text().strip() or DEFAULT_URL
    return DEFAULT_URL


async def connect(url: str | None = None, *, name: str = "interlock", patient: bool = True) -> NATS:
    """Connect, and keep reconnecting for as long as the process lives (cluster failover)."""

    async def on_error(e: Exception) -> None:
        log.warning("nats %s: %r", name, e)

    return await nats.connect(
        resolve_url(url).split(","),
        name=name,
        max_reconnect_attempts=-1 if patient else 3,
        reconnect_time_wait=0.25,
        connect_timeout=2,
        allow_reconnect=True,
        error_cb=on_error,
    )
