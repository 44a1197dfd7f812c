"""Who may approve: approvers and their roles, in the ``il_approvers`` bucket.

Once any approver is registered, a decision is accepted only from a registered approver (the
principal of the command subject) holding the role the request is for.
With no approver registered (a fresh development setup) the role named in
the decision is trusted, and the service says so in its log once.
"""

from __future__ import annotations

import contextlib
import json
import logging

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from interlock.contracts import subjects as s
from interlock.runtime.kvkeys import matching_keys

log = logging.getLogger(__name__)


class ApproverDirectory:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._kv: KeyValue | None = None
        self._warned = False

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(s.APPROVERS_BUCKET)
        return self._kv

    async def roles(self, approver: str) -> set[str] | None:
        """The approver's roles, or None if the directory is empty (not enforcing)."""
        kv = await self.kv()
        try:
            entry = await kv.get(approver)
            return set(json.loads(entry.value or b"{}").get("roles", []))
        except KeyNotFoundError:
            pass
        if await self.enforcing():
            return set()
        if not self._warned:
            log.warning("no approvers are registered: trusting the role each decision names "
                        "(register approvers with `interlock approvers grant NAME ROLE`)")
            self._warned = True
        return None

    async def enforcing(self) -> bool:
        kv = await self.kv()
        return bool(await matching_keys(kv))

    async def grant(self, approver: str, roles: list[str]) -> set[str]:
        kv = await self.kv()
        current: set[str] = set()
        with contextlib.suppress(KeyNotFoundError):
            current = set(json.loads((await kv.get(approver)).value or b"{}").get("roles", []))
        current |= set(roles)
        await kv.put(approver, json.dumps({"roles": sorted(current)}).encode())
        return current

    async def revoke(self, approver: str, roles: list[str] | None = None) -> set[str]:
        kv = await self.kv()
        if not roles:
            await kv.purge(approver)
            return set()
        try:
            current = set(json.loads((await kv.get(approver)).value or b"{}").get("roles", []))
        except KeyNotFoundError:
            return set()
        current -= set(roles)
        await kv.put(approver, json.dumps({"roles": sorted(current)}).encode())
        return current

    async def list(self) -> dict[str, list[str]]:
        kv = await self.kv()
        out = {}
        for key in await matching_keys(kv):
            entry = await kv.get(key)
            out[key] = sorted(json.loads(entry.value or b"{}").get("roles", []))
        return out
