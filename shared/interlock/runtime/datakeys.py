"""Per-tenant data keys, and sealing and opening sensitive payload values with them.

Keys come from one place per process (settings, mixed into every process kind's settings class):

- ``INTERLOCK_DATA_KEYS_FILE``: the keyring file (JSON, mode 0600; default
  ``.interlock/data-keys.json``, which ``interlock up`` keeps under its home). A tenant that has
  never had a key gets one the first time a value of it is sealed (under an exclusive lock, so
  processes sharing the file agree); a file readable by group or others is refused.
- ``INTERLOCK_DATA_KEYS``: the keyring itself, as JSON, for deployments that hand secrets in
  through the environment (read-only: keys are created with ``interlock tenant keys rotate``
  against a file and distributed by you).
- ``INTERLOCK_SENSITIVE_KEYS``: comma-separated key-name patterns whose values are sensitive
  everywhere (default ``api_key,password,secret,token,authorization``; see
  :func:`interlock.core.sealed.key_matches`).

Keyring format::

    {"version": 1, "tenants": {"acme": {"active": "k20261202-1a2b3c4d",
                                        "keys": {"k20261202-1a2b3c4d": "<base64 of 32 random bytes>"},
                                        "destroyed": [], "forgotten_at": null}}}

Rotation adds a key and makes it active; older keys stay for reading what they sealed. Forgetting
a tenant deletes every key of it and records their ids as destroyed: its sealed values can never
be read again ("data key destroyed"), while the log, its hashes and signatures are untouched.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr

from interlock.core import sealed
from interlock.core.sealed import DataKeyDestroyed, DataKeyMissing, Header, SealedInvalid, SensitiveRules

DEFAULT_DATA_KEYS_FILE = Path(".interlock/data-keys.json")
FILE_ENV = "INTERLOCK_DATA_KEYS_FILE"
INLINE_ENV = "INTERLOCK_DATA_KEYS"


class DataKeyError(Exception):
    """The keyring cannot be used (unreadable, malformed, too open). The message names the source."""


class DataKeySettings(BaseModel):
    """The data-key fields, mixed into a settings class (``INTERLOCK_DATA_KEYS_FILE`` etc.)."""

    data_keys_file: Path | None = Field(None, description="keyring file of the tenants' data keys (0600)")
    data_keys: SecretStr | None = Field(None, description="the keyring as JSON (instead of a file)")
    sensitive_keys: str = Field(",".join(sealed.DEFAULT_SENSITIVE_KEYS),
                                description="comma-separated key-name patterns whose values are sealed")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_kid() -> str:
    return f"k{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}"


class DataKeyring:
    """The tenants' data keys, from a file (re-read when it changes, so a rotation or a forget
    reaches running processes) or from inline JSON. Safe for concurrent threads."""

    def __init__(self, path: Path | None = None, inline: str | None = None) -> None:
        self.path = None if inline is not None else (path or DEFAULT_DATA_KEYS_FILE)
        self.source = f"{INLINE_ENV}" if inline is not None else f"{self.path} ({FILE_ENV})"
        self._data: dict[str, Any] = self._parse(inline) if inline is not None else {"version": 1, "tenants": {}}
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: DataKeySettings) -> DataKeyring:
        inline = settings.data_keys.get_secret_value() if settings.data_keys is not None else None
        return cls(settings.data_keys_file, inline)

    # -- reading -------------------------------------------------------------------------------
    def _parse(self, text: str) -> dict[str, Any]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataKeyError(f"{self.source}: not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("tenants"), dict):
            raise DataKeyError(f"{self.source}: expected an object with 'tenants'")
        return data

    def _refresh(self) -> dict[str, Any]:
        if self.path is None:
            return self._data
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._data, self._stamp = {"version": 1, "tenants": {}}, None
            return self._data
        if st.st_mode & 0o077:
            raise DataKeyError(f"{self.source}: readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                               f"chmod 600 {self.path}")
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._data, self._stamp = self._parse(self.path.read_text()), stamp
        return self._data

    def _tenant(self, tenant: str) -> dict[str, Any] | None:
        entry = self._refresh()["tenants"].get(tenant)
        return entry if isinstance(entry, dict) else None

    def key(self, tenant: str, kid: str) -> bytes:
        """The key ``kid`` of ``tenant``; raises :class:`DataKeyDestroyed` if it was destroyed."""
        with self._lock:
            entry = self._tenant(tenant) or {}
        material = (entry.get("keys") or {}).get(kid)
        if material is None:
            if kid in (entry.get("destroyed") or ()):
                raise DataKeyDestroyed(f"data key destroyed: key {kid} of tenant {tenant} was destroyed "
                                       f"(interlock tenant forget, {entry.get('forgotten_at') or 'date unknown'}); "
                                       "the value can never be read again")
            raise DataKeyMissing(f"no data key {kid} for tenant {tenant} in {self.source}")
        return self._material(material, tenant, kid)

    def _material(self, text: Any, tenant: str, kid: str) -> bytes:
        try:
            key = base64.b64decode(text, validate=True)
        except (ValueError, TypeError):
            raise DataKeyError(f"{self.source}: key {kid} of tenant {tenant} is not base64") from None
        if len(key) != sealed.KEY_BYTES:
            raise DataKeyError(f"{self.source}: key {kid} of tenant {tenant} is not {sealed.KEY_BYTES} bytes")
        return key

    def active(self, tenant: str) -> tuple[str, bytes]:
        """The key new values of ``tenant`` are sealed under (created on first use with a file)."""
        with self._lock:
            entry = self._tenant(tenant)
        if entry is None or not entry.get("active"):
            if entry is not None and entry.get("forgotten_at"):
                raise DataKeyDestroyed(f"data key destroyed: tenant {tenant} was forgotten "
                                       f"({entry['forgotten_at']}); `interlock tenant keys rotate {tenant}` "
                                       "gives it a new key")
            if self.path is None:
                raise DataKeyMissing(f"no data key for tenant {tenant} in {self.source} "
                                     f"(create one: interlock tenant keys rotate {tenant})")
            kid = self._update(tenant, create_only=True)
            return kid, self.key(tenant, kid)
        kid = str(entry["active"])
        return kid, self.key(tenant, kid)

    def tenants(self) -> dict[str, dict[str, Any]]:
        """Every tenant's active key id, key ids and destroyed key ids (no key material)."""
        with self._lock:
            data = self._refresh()
        return {name: {"active": e.get("active"), "keys": sorted(e.get("keys") or {}),
                       "destroyed": list(e.get("destroyed") or []), "forgotten_at": e.get("forgotten_at")}
                for name, e in data["tenants"].items() if isinstance(e, dict)}

    # -- writing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        if self.path is None:
            raise DataKeyError(f"{self.source} is read-only: manage keys in a keyring file ({FILE_ENV})")
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # processes sharing the file take turns
            with self._lock:
                self._stamp = None
                data = self._refresh()
                yield data
                self._write(data)
        finally:
            os.close(fd)

    def _write(self, data: dict[str, Any]) -> None:
        assert self.path is not None
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._stamp = None

    def _update(self, tenant: str, *, create_only: bool = False) -> str:
        with self._locked() as data:
            entry = data["tenants"].setdefault(tenant, {"active": None, "keys": {}, "destroyed": []})
            if create_only and entry.get("active"):
                return str(entry["active"])  # another process created it meanwhile
            if create_only and entry.get("forgotten_at"):  # forgotten meanwhile: only a rotate revives it
                raise DataKeyDestroyed(f"data key destroyed: tenant {tenant} was forgotten ({entry['forgotten_at']})")
            kid = new_kid()
            entry.setdefault("keys", {})[kid] = base64.b64encode(secrets.token_bytes(sealed.KEY_BYTES)).decode()
            entry["active"] = kid
            entry["forgotten_at"] = None
            entry["rotated_at"] = _now()
            return kid

    def rotate(self, tenant: str) -> str:
        """Give ``tenant`` a new active key (old ones stay, for reading); its id."""
        return self._update(tenant)

    def forget(self, tenant: str) -> list[str]:
        """Destroy every data key of ``tenant``; the ids destroyed."""
        with self._locked() as data:
            entry = data["tenants"].setdefault(tenant, {"keys": {}, "destroyed": []})
            gone = sorted(entry.get("keys") or {})
            entry["destroyed"] = sorted({*(entry.get("destroyed") or []), *gone})
            entry["keys"] = {}
            entry["active"] = None
            entry["forgotten_at"] = _now()
            return gone


class PayloadSealer:
    """Seals a tenant's sensitive values under its active key and opens them again."""

    def __init__(self, keyring: DataKeyring, rules: SensitiveRules | None = None) -> None:
        self.keyring = keyring
        self.rules = rules or SensitiveRules()

    @classmethod
    def from_settings(cls, settings: DataKeySettings) -> PayloadSealer:
        patterns = tuple(p.strip() for p in settings.sensitive_keys.split(",") if p.strip())
        return cls(DataKeyring.from_settings(settings), SensitiveRules(patterns=patterns))

    def seal_value(self, tenant: str, run: str, value: Any) -> dict[str, Any]:
        kid, key = self.keyring.active(tenant)
        return sealed.seal(key, Header(kid=kid, tenant=tenant, run=run), value)

    def seal_tree(self, tenant: str, run: str, value: Any, root: str, paths: tuple[str, ...] | frozenset[str] = ()
                  ) -> Any:
        """``value`` (at path ``root``: ``input``, ``steps.ID.output``) with its sensitive values sealed."""
        rules = self.rules.with_paths(paths) if paths else self.rules
        if not rules.needs_sealing(value, root):  # the common case: nothing to seal, nothing copied
            return value
        return rules.seal_tree(value, root, lambda clear: self.seal_value(tenant, run, clear))

    def open(self, tenant: str, envelope: Any) -> Any:
        head = sealed.header(envelope)
        if head.tenant != tenant:  # never open another tenant's value for this one
            raise SealedInvalid(f"sealed value of tenant {head.tenant} reached tenant {tenant}")
        return sealed.open_sealed(self.keyring.key(tenant, head.kid), envelope)

    def open_tree(self, tenant: str, value: Any) -> Any:
        """``value`` with every envelope replaced by its clear value."""
        return sealed.open_tree(value, lambda envelope: self.open(tenant, envelope))


__all__ = ["DEFAULT_DATA_KEYS_FILE", "FILE_ENV", "INLINE_ENV", "DataKeyError", "DataKeySettings", "DataKeyring",
           "PayloadSealer", "new_kid"]
