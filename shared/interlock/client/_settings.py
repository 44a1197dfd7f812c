"""The client's settings, read from the environment when a client connects (never at import)."""

from __future__ import annotations

import getpass
import re
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from interlock.client._errors import Unavailable
from interlock.contracts import subjects as s
from interlock.identity import CredsError, JwtError, decode_jwt, read_creds
from interlock.runtime.connect import DEFAULT_URL, admin_creds_file, url_file
from interlock.runtime.datakeys import DataKeySettings
from interlock.runtime.tls import TlsSettings

ENV_PREFIX = "INTERLOCK_"


class ClientSettings(BaseSettings, TlsSettings, DataKeySettings):
    """Where the client connects and as whom: ``INTERLOCK_NATS_URL``, ``INTERLOCK_TENANT``,
    ``INTERLOCK_CREDS``, ``INTERLOCK_PRINCIPAL``, ``INTERLOCK_CONNECT_TIMEOUT``, and TLS:
    ``INTERLOCK_TLS_CA``, ``INTERLOCK_TLS_CERT``, ``INTERLOCK_TLS_KEY``, ``INTERLOCK_TLS_HOSTNAME`` (see
    :mod:`interlock.runtime.tls`), and the data keys a run's sensitive input is sealed with:
    ``INTERLOCK_DATA_KEYS_FILE``, ``INTERLOCK_DATA_KEYS``, ``INTERLOCK_SENSITIVE_KEYS`` (see
    :mod:`interlock.runtime.datakeys`). Other
    ``INTERLOCK_*`` variables belong to other process kinds."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    nats_url: str | None = None
    """NATS URL, comma-separated for a cluster; unset: the URL file (``$INTERLOCK_HOME/nats.url``,
    else ``.interlock/nats.url``), else the default."""
    tenant: str = "default"
    creds: Path | None = None
    """A NATS credentials (.creds) file; unset: the admin creds `interlock up` wrote, if there."""
    connect_timeout: float = Field(1.2, gt=0)
    """Seconds the first connection may take in all (``INTERLOCK_CONNECT_TIMEOUT``): a client that is
    not ``patient`` fails within this long, naming the URL, when no server answers."""
    principal: str | None = None
    """Who sends commands; unset: the creds file's user name, else $USER (see :func:`principal_of`)."""

    @field_validator("nats_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for part in value.split(","):
            if "://" not in part.strip():
                raise ValueError(f"{part.strip()!r} is not a URL (expected nats://host:port)")
        return value.strip()

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return s.token(value, "tenant")

    @field_validator("principal")
    @classmethod
    def _principal(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else s.token(value.strip(), "principal")

    @field_validator("creds")
    @classmethod
    def _creds(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value}: no such file")
        return value

    @classmethod
    def load(cls, **overrides: object) -> ClientSettings:
        """Read the environment (``overrides`` that are not None win); a bad value raises
        :class:`Unavailable` naming the variable, e.g. ``INTERLOCK_TENANT: tenant 'a.b' is not a
        valid subject token`` (or the argument: ``tenant: …``)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**given)  # type: ignore[arg-type]
        except ValidationError as e:
            first = e.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "?"
            message = str(first["msg"]).removeprefix("Value error, ")
            if first["type"] == "tls_file":  # TLS: "is not a file (…)" reads with the value in front
                message = f"{first['input']!r} {message}"
            if field in given:  # the caller's own argument: the message names the value
                raise Unavailable(f"{field}: {message}") from None
            raise Unavailable(f"{ENV_PREFIX}{field.upper()}: {message}") from None

    def resolve_principal(self, creds: Path | None = None) -> str:
        """The principal of the client's commands: ``principal`` (argument or INTERLOCK_PRINCIPAL),
        else the user name in the creds file (``creds``, the one the client connects with; the
        server accepts a credential's commands only under that name), else the login name
        (``$USER``…) made a subject token."""
        if self.principal:
            return self.principal
        creds = creds if creds is not None else self.creds
        if creds is not None:
            try:
                jwt, _ = read_creds(creds)
                name = str(decode_jwt(jwt, expect="user").get("name") or "")
            except (CredsError, JwtError) as e:
                raise Unavailable(f"{creds}: {e}") from None
            if name:
                return s.token(name, f"user name in {creds}")
        try:
            user = getpass.getuser()  # $LOGNAME, $USER, $LNAME, $USERNAME, else the password database
        except (OSError, KeyError):
            user = ""
        return re.sub(r"[^A-Za-z0-9_\-]+", "-", user).strip("-") or "anonymous"

    def resolve_url(self, explicit: str | None = None, explicit_from: str = "argument") -> tuple[str, str]:
        """(url, where it came from): the argument (``explicit_from`` names it, e.g. ``--nats``),
        INTERLOCK_NATS_URL, the file `interlock up` wrote, else the default."""
        if explicit:
            return explicit, explicit_from
        if self.nats_url:
            return self.nats_url, f"{ENV_PREFIX}NATS_URL"
        found = url_file()  # in $INTERLOCK_HOME, else .interlock
        if found.exists():
            text = found.read_text().strip()
            if text:
                return text, str(found)
        return DEFAULT_URL, "default"

    def resolve_creds(self, explicit: Path | None = None) -> tuple[Path | None, str]:
        """(creds file, where it came from): the argument, INTERLOCK_CREDS, the admin creds
        `interlock up` wrote (``{home}/identity/creds/admin.creds``, home ``$INTERLOCK_HOME`` else
        ``.interlock``), else none."""
        if explicit is not None:
            return explicit, "argument"
        if self.creds is not None:
            return self.creds, f"{ENV_PREFIX}CREDS"
        if admin_creds_file().is_file():
            return admin_creds_file(), "default"
        return None, "none"
