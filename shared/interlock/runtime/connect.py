"""Connecting to NATS the same way everywhere: services, workers, the CLI and tests.

Every connection is authenticated: a process gives its ``.creds`` file (``creds=``, or
``INTERLOCK_CREDS`` through its settings) and connects with that credential's inbox prefix, the
only inboxes it may subscribe to. A refused connection is one clear line naming the URL and the
credential (:class:`ConnectRefused`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS

from interlock.identity import CredsError, creds_inbox_prefix, describe_permission_error
from interlock.runtime import tls as _tls

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"


HOME_ENV = "INTERLOCK_HOME"
DEFAULT_HOME = Path(".interlock")
URL_FILE = DEFAULT_HOME / "nats.url"  # written by `interlock up` for the other commands
ADMIN_CREDS_FILE = DEFAULT_HOME / "identity" / "creds" / "admin.creds"  # written by `interlock up`


def home_dir() -> Path:
    """The state directory of `interlock up` that the other commands look in: ``INTERLOCK_HOME``,
    else ``.interlock`` (relative to the working directory)."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME)


def url_file(home: Path | None = None) -> Path:
    """The file `interlock up --home HOME` writes its server's URL to: ``{home}/nats.url``."""
    return (home if home is not None else home_dir()) / "nats.url"


def admin_creds_file(home: Path | None = None) -> Path:
    """The admin credential `interlock up --home HOME` issues: ``{home}/identity/creds/admin.creds``."""
    return (home if home is not None else home_dir()) / "identity" / "creds" / "admin.creds"


class NoServerAnswered(ConnectionError):
    """No server accepted the first connection within the time allowed (str: one line with the URL)."""


class ConnectRefused(ConnectionError):
    """The server refused the connection's credentials, or the creds file is unusable (str: one line)."""


def resolve_url(url: str | None = None) -> str:
    """An explicit URL, else INTERLOCK_NATS_URL, else the one `interlock up` wrote (in
    ``$INTERLOCK_HOME``, else ``.interlock``), else the default."""
    if url:
        return url
    if os.environ.get("INTERLOCK_NATS_URL"):
        return os.environ["INTERLOCK_NATS_URL"]
    if url_file().exists():
        return url_file().read_text().strip() or DEFAULT_URL
    return DEFAULT_URL


def creds_options(creds: Path | str | None) -> dict[str, Any]:
    """The ``nats.connect`` options of a credential: ``user_credentials`` and its ``inbox_prefix``
    (none without creds). A missing or damaged file raises :class:`ConnectRefused`."""
    if creds is None:
        return {}
    path = Path(creds)
    try:
        prefix = creds_inbox_prefix(path)
    except CredsError as e:
        raise ConnectRefused(str(e)) from None
    return {"user_credentials": str(path), "inbox_prefix": prefix}


def describe_refusal(error: BaseException, url: str, creds: Path | str | None) -> str | None:
    """One line for an authorization failure at connect (naming the URL and the credential), else None."""
    who = f"credential {creds}" if creds is not None else "an anonymous connection (no creds given)"
    message = describe_permission_error(error, principal=who, action=f"connect to {url}")
    if message is None:
        return None
    if creds is None:
        message += "; give a .creds file with --creds or INTERLOCK_CREDS"
    return message


def is_refusal(error: BaseException) -> bool:
    """Whether ``error`` is the server refusing the credentials (not a network fault to ride out)."""
    text = str(error).lower()
    return (isinstance(error, nats.errors.AuthorizationError) or "authorization violation" in text
            or "authentication revoked" in text or "authentication expired" in text)


async def connect(url: str | None = None, *, creds: Path | str | None = None, name: str = "interlock",
                  patient: bool = True, tls: _tls.TlsOptions | None = None, within: float | None = None,
                  **options: Any) -> NATS:
    """Connect as ``creds``, and keep reconnecting for as long as the process lives (cluster
    failover). A refused credential raises :class:`ConnectRefused` at once: a patient client
    would otherwise retry it for ever. ``within``: seconds the first connection may take in all
    (every URL, every attempt) before :class:`NoServerAnswered`; None: as many attempts as
    ``patient`` allows, each up to 2 s. ``tls``: the TLS settings (``INTERLOCK_TLS_*``), e.g. the
    process's settings object; a failed handshake raises :class:`~interlock.runtime.tls.TlsError`."""
    target = resolve_url(url)
    servers = target.split(",")
    tls_options = _tls.connect_options(servers, tls)  # TLS: a tls:// URL or INTERLOCK_TLS_* files
    starting = True
    nc = NATS()
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[BaseException] = loop.create_future()

    theirs = options.pop("error_cb", None)

    async def on_error(e: Exception) -> None:
        if not nc.is_connected and is_refusal(e) and not refused.done():
            refused.set_result(e)
            return
        if starting:
            _tls.raise_if_tls_failure(e)  # TLS: a failed handshake ends the first connect, never retried
        if theirs is not None:
            await theirs(e)
        else:
            described = _tls.describe_failure(e, target, tls, tls_used=bool(tls_options))
            log.warning("nats %s: %s", name, described or repr(e))

    settings: dict[str, Any] = {
        "name": name, "max_reconnect_attempts": -1 if patient else 3, "reconnect_time_wait": 0.25,
        "connect_timeout": 2, "allow_reconnect": True, "error_cb": on_error,
        **creds_options(creds), **tls_options, **options,
    }
    connecting: asyncio.Future[Any] = asyncio.ensure_future(nc.connect(servers, **settings))
    try:
        await asyncio.wait([connecting, refused], timeout=within, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        connecting.cancel()
        raise
    if not connecting.done() and not refused.done():  # ``within`` ran out: nobody answered in time
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        raise NoServerAnswered(f"no NATS server answered at {target} within {within:g} s")
    error: BaseException | None = refused.result() if refused.done() else None
    if error is None:
        try:
            connecting.result()
        except Exception as e:
            if not is_refusal(e) and not is_refusal(nc.last_error or e):
                # TLS: a failed handshake becomes a sentence naming the setting to fix
                described = _tls.describe_failure(e, target, tls, tls_used=bool(tls_options))
                if described is None:
                    raise
                raise _tls.TlsError(described) from e
            error = e if is_refusal(e) else nc.last_error
        else:
            starting = False
            await _tls.require_negotiated(nc, servers)
            return nc
    connecting.cancel()
    with contextlib.suppress(BaseException):
        await connecting
    with contextlib.suppress(Exception):
        await nc.close()
    assert error is not None
    raise ConnectRefused(describe_refusal(error, target, creds) or f"cannot connect to {target}: {error}")


__all__ = ["ADMIN_CREDS_FILE", "DEFAULT_HOME", "DEFAULT_URL", "HOME_ENV", "URL_FILE", "ConnectRefused",
           "NoServerAnswered", "admin_creds_file", "connect", "creds_options", "describe_refusal", "home_dir",
           "is_refusal", "resolve_url", "url_file"]
