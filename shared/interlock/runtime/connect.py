"""Connecting to NATS the same way everywhere: services, workers, the CLI and tests."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from interlock.runtime import tls as _tls

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


async def connect(url: str | None = None, *, name: str = "interlock", patient: bool = True,
                  tls: _tls.TlsOptions | None = None) -> NATS:
    """Connect, and keep reconnecting for as long as the process lives (cluster failover).
    ``tls``: the TLS settings (``INTERLOCK_TLS_*``), e.g. the process's settings object."""
    servers = resolve_url(url).split(",")
    tls_options = _tls.connect_options(servers, tls)  # TLS: a tls:// URL or INTERLOCK_TLS_* files
    starting = True

    async def on_error(e: Exception) -> None:
        described = _tls.describe_failure(e, ",".join(servers), tls, tls_used=bool(tls_options))
        if starting:
            _tls.raise_if_tls_failure(e)  # TLS: a failed handshake ends the first connect, never retried
        log.warning("nats %s: %s", name, described or repr(e))

    try:
        nc = await nats.connect(
            servers,
            name=name,
            max_reconnect_attempts=-1 if patient else 3,
            reconnect_time_wait=0.25,
            connect_timeout=2,
            allow_reconnect=True,
            error_cb=on_error,
            **tls_options,
        )
    except Exception as e:  # TLS: a failed handshake becomes a sentence naming the setting to fix
        described = _tls.describe_failure(e, ",".join(servers), tls, tls_used=bool(tls_options))
        if described is None:
            raise
        raise _tls.TlsError(described) from e
    starting = False
    await _tls.require_negotiated(nc, servers)
    return nc
