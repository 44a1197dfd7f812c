"""The api service's settings: ``INTERLOCK_API_*`` (NATS URL and credential: the client's ``INTERLOCK_*``).

- ``INTERLOCK_API_HOST`` (127.0.0.1), ``INTERLOCK_API_PORT`` (8081; 0: any free port)
- ``INTERLOCK_API_MAX_BODY_BYTES``: the largest request body accepted (1 MiB); a larger one is a 413
- ``INTERLOCK_API_SESSION_SECRET``: signs the console's session cookies (every copy needs the same);
  unset: read from ``INTERLOCK_API_SESSION_SECRET_FILE`` (``.interlock/api-session.secret``),
  which is created (0600, 32 random bytes) on first start
- ``INTERLOCK_API_SESSION_MAX_AGE_S``: how long a console session lasts (12 h)
- ``INTERLOCK_API_SECURE_COOKIES``: mark cookies Secure (behind HTTPS; default false for the local stack)
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 8081
DEFAULT_SECRET_FILE = Path(".interlock") / "api-session.secret"


class ApiSettingsError(Exception):
    """A setting cannot be used; the message names the variable."""


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTERLOCK_API_", extra="forbid", env_ignore_empty=True)

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    session_secret: SecretStr | None = None
    session_secret_file: Path = DEFAULT_SECRET_FILE
    session_max_age_s: int = Field(12 * 3600, ge=60)
    secure_cookies: bool = False

    @classmethod
    def load(cls, **overrides: object) -> ApiSettings:
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**given)  # type: ignore[arg-type]
        except ValidationError as e:
            first = e.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "?"
            raise ApiSettingsError(f"INTERLOCK_API_{field.upper()}: {first['msg']}") from None

    def secret(self) -> str:
        """The session-signing secret: the setting, else the file's (created on first use)."""
        if self.session_secret is not None:
            value = self.session_secret.get_secret_value()
            if len(value) < 16:
                raise ApiSettingsError("INTERLOCK_API_SESSION_SECRET: must be at least 16 characters")
            return value
        return secret_file(self.session_secret_file)


def secret_file(path: Path) -> str:
    """The secret kept in ``path``, created there (0600) if absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another copy created it first
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
    value = path.read_text().strip()
    if len(value) < 16:
        raise ApiSettingsError(f"{path}: the session secret is missing or shorter than 16 characters")
    return value
