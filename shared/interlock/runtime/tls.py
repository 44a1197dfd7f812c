"""TLS to NATS: ``tls://`` URLs, a CA to trust, and an optional client certificate (mutual TLS).

Settings (each process kind's settings class mixes in :class:`TlsSettings`; the client reads the same
variables):

- ``INTERLOCK_TLS_CA``: PEM file of the CA(s) that signed the server's certificate; unset: the
  system trust store
- ``INTERLOCK_TLS_CERT``: PEM file of this process's client certificate, for a server that
  verifies clients (it may hold the private key too)
- ``INTERLOCK_TLS_KEY``: PEM file of the client certificate's private key
- ``INTERLOCK_TLS_HOSTNAME``: the name to check the server's certificate against, when it is not
  the URL's host (a certificate for ``localhost`` reached via ``127.0.0.1``)

TLS is used when a URL says ``tls://`` or any of these files is given; a server that requires TLS
is always spoken to over TLS (nats-py upgrades the connection). The context is the standard
library's :func:`ssl.create_default_context`: certificate and host name verified, TLS 1.2 at least.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError

ENV_NAMES: Mapping[str, str] = {"ca": "INTERLOCK_TLS_CA", "cert": "INTERLOCK_TLS_CERT",
                                "key": "INTERLOCK_TLS_KEY", "hostname": "INTERLOCK_TLS_HOSTNAME"}
"""Where each TLS option comes from, for error messages (the CLI passes its flags' names instead)."""


class TlsError(Exception):
    """The TLS options cannot be used, or the TLS handshake failed. The message names the option."""


class TlsOptions(Protocol):
    """What :func:`connect_options` reads: any settings object with the four TLS fields."""

    @property
    def tls_ca(self) -> Path | None: ...
    @property
    def tls_cert(self) -> Path | None: ...
    @property
    def tls_key(self) -> Path | None: ...
    @property
    def tls_hostname(self) -> str | None: ...


class TlsSettings(BaseModel):
    """The TLS fields, mixed into a settings class (``INTERLOCK_TLS_CA`` etc. with its prefix)."""

    tls_ca: Path | None = Field(None, description="CA file (PEM) to trust; unset: the system trust store")
    tls_cert: Path | None = Field(None, description="client certificate file (PEM), for mutual TLS")
    tls_key: Path | None = Field(None, description="the client certificate's private key file (PEM)")
    tls_hostname: str | None = Field(None, description="name to verify the server's certificate against")

    @field_validator("tls_ca", "tls_cert", "tls_key")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.exists():
            raise PydanticCustomError("tls_file", "is not a file (no such file or directory)")
        if not value.is_file():
            raise PydanticCustomError("tls_file", "is not a file (it is a directory)")
        try:
            with value.open("rb"):
                pass
        except OSError as e:
            raise PydanticCustomError("tls_file", "cannot be read ({reason})",
                                      {"reason": e.strerror or str(e)}) from None
        return value

    @field_validator("tls_hostname")
    @classmethod
    def _hostname(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


def wants_tls(urls: str | Sequence[str]) -> bool:
    """Whether any of the URLs (a list, or comma-separated) says ``tls://``."""
    parts = urls.split(",") if isinstance(urls, str) else urls
    return any(part.strip().lower().startswith("tls://") for part in parts)


def ssl_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None, *,
                names: Mapping[str, str] = ENV_NAMES) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca`` (else the system trust store) and
    presents ``cert``/``key`` when given. A file that is not what it should be raises
    :class:`TlsError` naming the option (``names``: option → variable or flag)."""
    if key is not None and cert is None:
        raise TlsError(f"{names['key']} is set but {names['cert']} is not: a private key needs its certificate")
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"{names['ca']}: {ca} is not a PEM file of CA certificates ({_reason(e)})") from None
    if cert is not None:
        try:
            context.load_cert_chain(str(cert), str(key) if key is not None else None)
        except (ssl.SSLError, OSError) as e:
            which = f"{names['cert']} ({cert})" + (f" and {names['key']} ({key})" if key is not None else "")
            hint = "" if key is not None else f"; set {names['key']} if the key is in a file of its own"
            raise TlsError(f"{which}: not a PEM certificate with its private key ({_reason(e)}){hint}") from None
    return context


def connect_options(urls: str | Sequence[str], options: TlsOptions | None, *,
                    names: Mapping[str, str] = ENV_NAMES) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect``: ``tls=`` (and ``tls_hostname=``) when a URL says
    ``tls://`` or a TLS file is given, else nothing (a server that requires TLS then gets the
    system trust store, nats-py's default)."""
    ca = options.tls_ca if options is not None else None
    cert = options.tls_cert if options is not None else None
    key = options.tls_key if options is not None else None
    hostname = options.tls_hostname if options is not None else None
    if not (wants_tls(urls) or ca or cert or key):
        return {}
    _quiet_asyncio_ssl_eof()
    result: dict[str, Any] = {"tls": ssl_context(ca, cert, key, names=names)}
    if hostname:
        result["tls_hostname"] = hostname
    return result


class _SslEofFilter(logging.Filter):
    """Drops asyncio's "returning true from eof_received() has no effect when using ssl", logged
    each time nats-py's TLS connection closes (its stream protocol asks to keep the half-closed
    socket, which TLS cannot): noise on every CLI command's stderr, nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


def _quiet_asyncio_ssl_eof() -> None:
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _SslEofFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_SslEofFilter())


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason).replace("_", " ").lower()
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def describe_failure(error: BaseException, url: str, options: TlsOptions | None, *, tls_used: bool,
                     names: Mapping[str, str] = ENV_NAMES) -> str | None:
    """A clear sentence for a TLS failure while connecting to ``url``, else None (not about TLS).
    ``tls_used``: whether a TLS context was passed (a connection closed early is then suspect)."""
    ca = options.tls_ca if options is not None else None
    cert = options.tls_cert if options is not None else None
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 5:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            detail = e.verify_message or _reason(e)
            if "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
                return (f"TLS: the certificate of the server at {url} is not for that host ({detail}); set "
                        f"{names['hostname']} to the name it was issued for")
            trusted = f"the CA in {names['ca']} ({ca})" if ca else f"the system trust store ({names['ca']} is not set)"
            if not wants_tls(url):  # nats-py upgraded a nats:// URL because the server requires TLS
                return (f"TLS: the server at {url} requires TLS, and its certificate is not trusted by {trusted}: "
                        f"{detail}; use a tls:// URL and set {names['ca']} to the CA file that signed it")
            return (f"TLS: the certificate of the server at {url} is not trusted by {trusted}: {detail}; "
                    f"set {names['ca']} to the CA file that signed it")
        if isinstance(e, ssl.SSLError):
            reason = _reason(e)
            if cert is None and ("certificate required" in reason or "alert" in reason):
                return (f"TLS: the server at {url} refused the connection ({reason}): it requires a client "
                        f"certificate; set {names['cert']} and {names['key']}")
            if cert is not None and "alert" in reason:  # the server's alert: our certificate is refused
                return (f"TLS: the server at {url} refused the client certificate in {names['cert']} ({cert}): "
                        f"{reason}; it must be signed by a CA the server trusts")
            return f"TLS handshake with the server at {url} failed: {reason}"
    if tls_used and cert is None and any(isinstance(e, ConnectionError | ssl.SSLEOFError | EOFError) for e in chain):
        # TLS 1.3: the handshake looks done to the client before the server checks its certificate
        return (f"TLS: the server at {url} closed the connection after the TLS handshake ({_reason(error)}); "
                f"if it verifies clients (mutual TLS), set {names['cert']} and {names['key']}")
    return None


def raise_if_tls_failure(error: Exception) -> None:
    """For a connection's error callback while it first connects: re-raise a failed TLS handshake,
    which ends the connect attempt with it. Retrying cannot fix a TLS set-up, and nats-py's retry
    after a failed certificate check hangs instead of failing."""
    if isinstance(error, ssl.SSLError):
        raise error


def negotiated(nc: Any) -> bool:
    """Whether ``nc``'s current connection is encrypted."""
    transport = getattr(nc, "_transport", None)  # nats-py has no public accessor for this
    writer = getattr(transport, "_io_writer", None)
    return writer is not None and writer.get_extra_info("ssl_object") is not None


async def require_negotiated(nc: Any, urls: str | Sequence[str]) -> None:
    """Close and refuse a connection made with a ``tls://`` URL that is not encrypted: nats-py
    upgrades only when the server requires TLS, so a ``tls://`` URL to a plain server would
    otherwise go on in plain text."""
    if wants_tls(urls) and not negotiated(nc):
        await nc.close()
        raise TlsError(f"TLS: the URL {_joined(urls)} asks for TLS but the server does not offer it; use a "
                       f"nats:// URL for a plain server, or enable TLS on the server")


def _joined(urls: str | Sequence[str]) -> str:
    return urls if isinstance(urls, str) else ",".join(urls)


__all__ = [
    "ENV_NAMES",
    "TlsError",
    "TlsOptions",
    "TlsSettings",
    "connect_options",
    "describe_failure",
    "negotiated",
    "raise_if_tls_failure",
    "require_negotiated",
    "ssl_context",
    "wants_tls",
]
