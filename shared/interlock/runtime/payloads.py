"""Large inputs and outputs: kept in the object store, travelling as a hashed reference."""

from __future__ import annotations

from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from interlock.contracts import subjects as s
from interlock.contracts.messages import PayloadRef
from interlock.contracts.protocol import INLINE_LIMIT_BYTES
from interlock.core.codec import canonical_json, sha256_hex

DEFAULT_INLINE_LIMIT = INLINE_LIMIT_BYTES


class PayloadError(ValueError):
    pass


class PayloadStore:
    def __init__(self, js: JetStreamContext, inline_limit: int = DEFAULT_INLINE_LIMIT) -> None:
        self.js = js
        self.inline_limit = inline_limit
        self._store: ObjectStore | None = None

    async def store(self) -> ObjectStore:
        if self._store is None:
            self._store = await self.js.object_store(s.PAYLOADS_OBJECT_STORE)
        return self._store

    async def offload(self, value: Any) -> tuple[Any, PayloadRef | None]:
        """(value, None) when small enough to travel inline, else (None, reference)."""
        data = canonical_json(value)
        if len(data) <= self.inline_limit:
            return value, None
        digest = sha256_hex(data)
        await self._put(digest, data)
        return None, PayloadRef(object_store=s.PAYLOADS_OBJECT_STORE, key=digest, sha256=digest, size=len(data))

    async def store_all(self, blobs: dict[str, bytes]) -> None:
        """Store payloads by their sha256 (idempotent: the same content is the same object)."""
        for digest, data in blobs.items():
            await self._put(digest, data)

    async def _put(self, digest: str, data: bytes) -> None:
        """Store ``data`` under its digest unless it is there already. Content-addressed, an
        existing object is the same bytes; and putting a name again makes the client purge the
        old chunks, which a service or worker credential may not do (stream purge is admin's)."""
        store = await self.store()
        try:
            info = await store.get_info(digest)
        except NotFoundError:
            info = None
        if info is not None and not info.deleted and info.size == len(data):
            return
        await store.put(digest, data)

    async def resolve(self, value: Any, ref: PayloadRef | None) -> Any:
        if ref is None:
            return value
        store = await self.store()
        result = await store.get(ref.key)
        data = result.data or b""
        if sha256_hex(data) != ref.sha256:
            raise PayloadError(f"payload {ref.key} does not match its sha256: it was altered")
        return msgspec.json.decode(data)
