"""Signing and trust for a process: its own key, and the keyring kept current from the bucket.

- :class:`KeyringWatch` — the keyring as the KV bucket ``subjects.KEYRING_BUCKET`` holds it, kept
  current by a watch (a key issued or revoked while services run reaches them in milliseconds)
  and asked again for a key it does not know before a commit signed with it is refused.
- :func:`read_keyring` — the keyring as the bucket holds it now (one read, for clients and tools).
- :func:`signing_enabled` — ``INTERLOCK_SIGNING`` (``on`` unless explicitly ``off``).
- :func:`authenticity_for` — the event store's :class:`Authenticity` for a process: signs with
  its credential's key, refuses what the keyring does not vouch for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from interlock.contracts import authorship as a
from interlock.contracts import subjects as s
from interlock.core.eventstore.authenticity import Authenticity, Refusal
from interlock.core.eventstore.recorder import StoredCommit
from interlock.identity import Keyring, Signer
from interlock.identity._signing import read_keyring_entries
from interlock.runtime.kvkeys import matching_keys

log = logging.getLogger(__name__)

SIGNING_ENV = "INTERLOCK_SIGNING"
OFF_WARNING = ("SIGNING IS OFF (INTERLOCK_SIGNING=off): commits are appended unsigned and unsigned commits are "
               "accepted; anyone who can publish to a run's subject can forge its history. Use only for "
               "benchmarks and for logs written before signing.")


class SigningError(RuntimeError):
    """Signing is on but this process has no key to sign with."""


def signing_enabled(value: str | None = None) -> bool:
    """Whether commits are signed and signatures required: ``on`` (the default) or ``off``."""
    raw = (value if value is not None else os.environ.get(SIGNING_ENV, "on")).strip().lower() or "on"
    if raw not in ("on", "off"):
        raise SigningError(f"{SIGNING_ENV}: {raw!r} is not on or off")
    return raw == "on"


async def read_keyring(js: JetStreamContext) -> Keyring:
    """The keyring as the bucket holds it now."""
    kv = await js.key_value(s.KEYRING_BUCKET)
    values = []
    for key in await matching_keys(kv):
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        if entry.value:
            values.append(entry.value)
    return Keyring(read_keyring_entries(values))


class KeyringWatch:
    """The keyring from the bucket, kept current. Implements the event store's ``CommitTrust``."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.keyring = Keyring()
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._asked: dict[str, float] = {}

    async def start(self) -> None:
        try:
            self._kv = await self.js.key_value(s.KEYRING_BUCKET)
        except NotFoundError:
            log.error("bucket %s does not exist (run `interlock provision`): no key is trusted", s.KEYRING_BUCKET)
            return
        watcher = await self._kv.watchall()
        loaded = asyncio.get_running_loop().create_future()

        async def follow() -> None:
            try:
                async for entry in watcher:
                    if entry is None:  # the initial values are in
                        if not loaded.done():
                            loaded.set_result(None)
                        continue
                    self._take(entry.key, entry.value, entry.operation)
                    if not loaded.done() and entry.delta == 0:
                        loaded.set_result(None)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a closed connection: the keyring stays as it was
                log.warning("keyring watch ended: %r", e)
            finally:
                if not loaded.done():
                    loaded.set_result(None)

        self._task = asyncio.create_task(follow(), name="keyring-watch")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(loaded), 10)
        log.info("keyring: %d trusted keys", len(self.keyring))

    def _take(self, key: str, value: bytes | None, operation: Any) -> None:
        if operation is not None and str(operation).upper().endswith(("DEL", "PURGE")):
            self.keyring.remove(key)
            return
        entries = read_keyring_entries([value or b""])
        if not entries or entries[0].key_id != key:
            log.error("keyring entry %s in %s is not a key entry; ignored", key, s.KEYRING_BUCKET)
            return
        self.keyring.put(entries[0])

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def prepare(self, key_ids: Iterable[str]) -> None:
        """Ask the bucket for keys this process does not know yet (issued a moment ago)."""
        if self._kv is None:
            return
        loop = asyncio.get_running_loop()
        for key_id in set(key_ids):
            if not key_id or key_id in self.keyring or not key_id.isalnum():
                continue
            if loop.time() - self._asked.get(key_id, -60.0) < 1.0:  # a forger's key: don't ask on every commit
                continue
            self._asked[key_id] = loop.time()
            with contextlib.suppress(KeyNotFoundError, Exception):
                entry = await self._kv.get(key_id)
                self._take(key_id, entry.value, entry.operation)

    def commit_problem(self, subject: str, envelopes: Sequence[Mapping[str, Any]], key_id: str | None,
                       signature: str | None, at: float | None) -> tuple[str, str] | None:
        return self.keyring.commit_problem(subject, envelopes, key_id, signature, at)

    def approval_problem(self, signed: a.SignedApproval, *, principal: str | None = None) -> tuple[str, str] | None:
        return self.keyring.approval_problem(signed, principal=principal)


def authenticity_for(creds: Path | None, trust: KeyringWatch | None, *, signing: bool,
                     on_refused: Callable[[Refusal, StoredCommit], None] | None = None, who: str = "") -> Authenticity:
    """The event store's authenticity for a process holding ``creds``."""
    if not signing:
        log.warning("%s: %s", who or "interlock", OFF_WARNING)
        return Authenticity(None, trust, require_signatures=False, on_refused=on_refused)
    if creds is None:
        raise SigningError(f"{who or 'this process'}: commits are signed with the process's credential, and none is "
                           f"set (INTERLOCK_CREDS); set one, or {SIGNING_ENV}=off for a benchmark")
    return Authenticity(Signer.from_creds(creds), trust, require_signatures=True, on_refused=on_refused)


__all__ = ["OFF_WARNING", "SIGNING_ENV", "KeyringWatch", "SigningError", "authenticity_for", "read_keyring",
           "signing_enabled"]
