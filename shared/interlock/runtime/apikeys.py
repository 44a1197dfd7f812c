"""HTTP API keys, in the ``il_apikeys`` bucket: each key's tenant, role and principal, stored hashed.

A key reads ``ilk_{key_id}_{secret}``: ``key_id`` (12 hex digits) names the record, ``secret`` is
32 random bytes (URL-safe base64). Only the SHA-256 of the whole key is stored; a key is shown
once, when it is created. Checking compares digests in constant time (``hmac.compare_digest``).
A 256-bit random secret needs no slow password hash: nothing shorter than the key can be guessed.

Each key also has its own Ed25519 signing key, registered in the keyring as its principal's: the
API signs the approvals made with the key with it (nobody approves for a principal without that
principal's key). Its seed is stored only encrypted (AES-GCM) under a key derived (HKDF-SHA256)
from the API key itself, so only a request that presents the API key can sign with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import nkeys
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from interlock.contracts import subjects as s
from interlock.contracts.messages import ApiKeyRecord
from interlock.identity import Keyring, Signer, key_entry, publish_keyring
from interlock.runtime.kvkeys import matching_keys

KEY_PREFIX = "ilk"
API_KEY_ROLES = ("viewer", "operator", "approver", "policy-admin", "admin")
"""The roles a key may have: the person roles of :mod:`interlock.identity` (what they allow through
the API: ``interlock.api.access``)."""

_KEY = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_\-]{{43}})$")
CACHE_SECONDS = 2.0
"""How long the api service trusts a record it read (a revoked key stops working within this)."""


_SIGNER_INFO = b"interlock.apikey.signer.v1:"


def wrap_key(key: str) -> bytes | None:
    """The 32-byte key that opens the signing seed of ``key`` (None for a malformed key)."""
    key_id = key_id_of(key)
    if key_id is None:
        return None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_SIGNER_INFO + key_id.encode()).derive(key.strip().encode())


def _seal_seed(seed: bytes, wrap: bytes, key_id: str) -> str:
    nonce = os.urandom(12)
    return base64.b64encode(nonce + AESGCM(wrap).encrypt(nonce, seed, key_id.encode())).decode()


def signer_of(record: ApiKeyRecord, wrap: bytes | None) -> Signer | None:
    """The key's own signer, opened with ``wrap`` (from :func:`wrap_key`); None when it has none
    or ``wrap`` does not open it."""
    if wrap is None or not record.signer_sealed:
        return None
    try:
        raw = base64.b64decode(record.signer_sealed)
        seed = AESGCM(wrap).decrypt(raw[:12], raw[12:], record.key_id.encode())
        return Signer(nkeys.from_seed(bytearray(seed)))
    except Exception:  # a wrong key, a damaged record: no signer (the approval is then refused)
        return None


class ApiKeyError(ValueError):
    """A key cannot be created or revoked as asked (unknown role, bad tenant, unknown key)."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id in a well-formed key, else None."""
    match = _KEY.match(key.strip())
    return match.group(1) if match else None


class ApiKeyStore:
    """Create, check, list and revoke API keys."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._kv: KeyValue | None = None
        self._cache: dict[str, tuple[float, ApiKeyRecord | None]] = {}

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(s.APIKEYS_BUCKET)
        return self._kv

    async def create(self, tenant: str, role: str, *, principal: str | None = None, by: str = "") -> tuple[
            ApiKeyRecord, str]:
        """A new key of ``role`` for ``tenant``: (its record, the key, to show once). The principal
        defaults to ``key-{key_id}``."""
        if role not in API_KEY_ROLES:
            raise ApiKeyError(f"unknown role {role!r}; roles are: {', '.join(API_KEY_ROLES)}")
        try:
            s.token(tenant, "tenant")
            if principal is not None:
                s.token(principal, "principal")
        except s.SubjectError as e:
            raise ApiKeyError(str(e)) from None
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        seed = bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
        signer = Signer(nkeys.from_seed(bytearray(seed)))
        wrap = wrap_key(key) or b""  # (the key was just made: always well-formed)
        record = ApiKeyRecord(key_id=key_id, tenant=tenant, role=role, principal=principal or f"key-{key_id}",
                              sha256=digest(key), created_at=datetime.now(UTC), created_by=by,
                              signer_key_id=signer.key_id, signer_sealed=_seal_seed(seed, wrap, key_id))
        # the signer first: a record is only usable once its key is trusted for its principal
        await publish_keyring(self.js, Keyring([self._entry(record)]))
        kv = await self.kv()
        await kv.create(key_id, record.model_dump_json().encode())  # a clash of 48 random bits fails, never overwrites
        return record, key

    @staticmethod
    def _entry(record: ApiKeyRecord, revoked_at: int | None = None) -> Any:
        return key_entry(key_id=record.signer_key_id or "", principal=record.principal, role=record.role, kind="person",
                         tenant=record.tenant, valid_from=int(record.created_at.timestamp()), revoked_at=revoked_at)

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        """The record of ``key_id`` (revoked ones too), None if there is none."""
        kv = await self.kv()
        try:
            entry = await kv.get(key_id)
        except (KeyNotFoundError, NotFoundError):
            return None
        if not entry.value:
            return None
        return ApiKeyRecord.model_validate_json(entry.value)

    async def check(self, key: str) -> ApiKeyRecord | None:
        """The active record the key belongs to, else None (malformed, unknown, revoked or a wrong
        secret: the caller cannot tell which)."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        record = await self.record(key_id)
        if record is None or not hmac.compare_digest(record.sha256, digest(key.strip())):
            return None
        return record

    async def record(self, key_id: str) -> ApiKeyRecord | None:
        """The active (not revoked) record of ``key_id``, read at most every :data:`CACHE_SECONDS`."""
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        record = await self.get(key_id)
        if record is not None and record.revoked_at is not None:
            record = None
        if len(self._cache) > 10_000:  # unknown ids are cached too: keep guessing from growing memory
            self._cache.clear()
        self._cache[key_id] = (now, record)
        return record

    async def list(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        """Every key's record (of ``tenant``), oldest first."""
        kv = await self.kv()
        keys = await matching_keys(kv)
        records = await asyncio.gather(*(self.get(k) for k in keys))
        found = [r for r in records if r is not None and (tenant is None or r.tenant == tenant)]
        return sorted(found, key=lambda r: (r.created_at, r.key_id))

    async def revoke(self, key_id: str, *, by: str = "") -> ApiKeyRecord:
        """Mark a key revoked (kept, for the record); revoking twice keeps the first time."""
        record = await self.get(key_id)
        if record is None:
            raise ApiKeyError(f"no API key {key_id!r}")
        if record.revoked_at is None:
            record = record.model_copy(update={"revoked_at": datetime.now(UTC), "revoked_by": by})
            if record.signer_key_id is not None:  # its signatures stop counting from now on
                await publish_keyring(self.js, Keyring([self._entry(record, int(time.time()))]))
            kv = await self.kv()
            await kv.put(key_id, record.model_dump_json().encode())
        with contextlib.suppress(KeyError):
            del self._cache[key_id]
        return record
