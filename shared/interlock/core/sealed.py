"""Sealed values: sensitive payload values encrypted per tenant, and which values are sensitive.

A sensitive value (a workflow's ``sensitive:`` path, or a key whose name matches a sensitive key
pattern such as ``api_key`` or ``password``) is never stored in clear: it is replaced by an
envelope ``{"$sealed": {...}}`` holding its AES-256-GCM ciphertext under the tenant's data key
(the format is specified in contracts/README.md, "Sensitive values"). Everything that stores or
hashes a payload sees only the envelope, so hashes and signatures cover the ciphertext and
verification needs no key; whatever shows a payload to people shows :data:`REDACTED` instead.

This module is pure (no key storage, no I/O): :mod:`interlock.runtime.datakeys` holds the keys.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEALED = "$sealed"
"""The one key of an envelope."""
ALG = "AES-256-GCM"
VERSION = 1
REDACTED = "[sensitive]"
"""What logs, the projection, the timeline and ``status`` show in place of a sensitive value."""
KEY_BYTES = 32
NONCE_BYTES = 12

DEFAULT_SENSITIVE_KEYS: tuple[str, ...] = ("api_key", "password", "secret", "token", "authorization")
"""Key names whose values are sensitive wherever they appear (``INTERLOCK_SENSITIVE_KEYS``)."""


class SealedError(Exception):
    """A sealed value cannot be opened. The message says which value and why."""


class DataKeyDestroyed(SealedError):
    """The tenant's data key was destroyed (``interlock tenant forget``): the value is unreadable for good."""


class DataKeyMissing(SealedError):
    """No data key is available for the tenant (or for this key id)."""


class SealedInvalid(SealedError):
    """The envelope is malformed, was altered, or belongs to another tenant."""


@dataclass(frozen=True)
class Header:
    """The authenticated clear part of an envelope: which key, which tenant and run."""

    kid: str
    tenant: str
    run: str


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise SealedInvalid(f"sealed value: '{what}' is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SealedInvalid(f"sealed value: '{what}' is not valid base64") from None


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def aad(header: Header) -> bytes:
    """The additional authenticated data: canonical JSON of alg, kid, run, tenant and v."""
    return _canonical({"alg": ALG, "kid": header.kid, "run": header.run, "tenant": header.tenant, "v": VERSION})


def is_sealed(value: Any) -> bool:
    """Whether ``value`` is an envelope (an object whose only key is ``$sealed``)."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(SEALED), dict)


def contains_sealed(value: Any) -> bool:
    """Whether an envelope is anywhere inside ``value`` (a JSON value: dicts, lists, scalars)."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get(SEALED), dict):
            return True
        return any(contains_sealed(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(contains_sealed(v) for v in value)
    return False


def header(envelope: Any) -> Header:
    """The envelope's key id, tenant and run (raises :class:`SealedInvalid` if it has none)."""
    if not is_sealed(envelope):
        raise SealedInvalid("not a sealed value")
    body = envelope[SEALED]
    if body.get("v") != VERSION or body.get("alg") != ALG:
        raise SealedInvalid(f"sealed value: unsupported version {body.get('v')!r} or algorithm {body.get('alg')!r}")
    fields = {name: body.get(name) for name in ("kid", "tenant", "run")}
    if not all(isinstance(v, str) for v in fields.values()) or not fields["kid"] or not fields["tenant"]:
        raise SealedInvalid("sealed value: 'kid', 'tenant' and 'run' must be strings")
    return Header(**fields)


def seal(key: bytes, header_: Header, value: Any) -> dict[str, Any]:
    """``value`` (any JSON value) encrypted under ``key``, as an envelope naming ``header_``."""
    nonce = os.urandom(NONCE_BYTES)  # random 96-bit nonces: safe far beyond any one key's use here
    ct = AESGCM(key).encrypt(nonce, _canonical(value), aad(header_))
    return {SEALED: {"v": VERSION, "alg": ALG, "kid": header_.kid, "tenant": header_.tenant, "run": header_.run,
                     "nonce": _b64(nonce), "ct": _b64(ct)}}


def open_sealed(key: bytes, envelope: Any) -> Any:
    """The clear value of ``envelope``; raises :class:`SealedInvalid` if it was altered or the key is wrong."""
    head = header(envelope)
    body = envelope[SEALED]
    nonce, ct = _unb64(body.get("nonce"), "nonce"), _unb64(body.get("ct"), "ct")
    if len(nonce) != NONCE_BYTES:
        raise SealedInvalid(f"sealed value: nonce must be {NONCE_BYTES} bytes")
    try:
        clear = AESGCM(key).decrypt(nonce, ct, aad(head))
    except InvalidTag:
        raise SealedInvalid(f"sealed value (tenant {head.tenant}, key {head.kid}) does not authenticate: "
                            "altered, or sealed under another key") from None
    return json.loads(clear)


def redact(value: Any) -> Any:
    """``value`` with every envelope replaced by :data:`REDACTED` (``value`` itself if it has none)."""
    if not contains_sealed(value):
        return value
    return _redact(value)


def _redact(value: Any) -> Any:
    if is_sealed(value):
        return REDACTED
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def open_tree(value: Any, opener: Callable[[Any], Any]) -> Any:
    """``value`` with every envelope replaced by ``opener(envelope)``."""
    if not contains_sealed(value):
        return value
    if is_sealed(value):
        return opener(value)
    if isinstance(value, dict):
        return {k: open_tree(v, opener) for k, v in value.items()}
    return [open_tree(v, opener) for v in value]


def normalized_key(name: str) -> str:
    return name.lower().replace("-", "_")


def key_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a key name is sensitive: equal to a pattern or ending in ``_pattern`` (case-insensitive,
    ``-`` read as ``_``: ``X-Api-Key`` and ``db_password`` match), or matching a glob pattern (``*pass*``)."""
    return _matcher_for(tuple(patterns))(name)


class _KeyMatcher:
    """:func:`key_matches` for fixed patterns, remembering each key name's answer (names repeat)."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        normalized = [normalized_key(p) for p in patterns]
        self.globs = tuple(p for p in normalized if any(c in p for c in "*?["))
        self.names = frozenset(p for p in normalized if p not in self.globs)
        self.seen: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        answer = self.seen.get(name)
        if answer is None:
            key = normalized_key(name)
            answer = (key in self.names or any(key.endswith("_" + p) for p in self.names)
                      or any(fnmatch.fnmatchcase(key, g) for g in self.globs))
            if len(self.seen) < 10_000:
                self.seen[name] = answer
        return answer


@dataclass(frozen=True)
class SensitiveRules:
    """Which values are sensitive: dotted ``paths`` (``input.credentials.api_key``,
    ``steps.fetch.output.token``; list items are not indexed: ``input.users.password`` is every
    user's) and key-name ``patterns``."""

    paths: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = DEFAULT_SENSITIVE_KEYS
    _matcher: _KeyMatcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_matcher", _matcher_for(self.patterns))

    def with_paths(self, paths: Iterable[str]) -> SensitiveRules:
        return SensitiveRules(self.paths | frozenset(paths), self.patterns)

    def sensitive(self, path: str, key: str | None) -> bool:
        return path in self.paths or (key is not None and self._matcher(key))

    def needs_sealing(self, value: Any, root: str) -> bool:
        """Whether :meth:`seal_tree` would change anything in ``value`` (found at path ``root``)."""
        if value is None or is_sealed(value):
            return False
        if root in self.paths:
            return True
        if isinstance(value, dict):
            return any((v is not None and not is_sealed(v) and self.sensitive(f"{root}.{k}", str(k)))
                       or self.needs_sealing(v, f"{root}.{k}") for k, v in value.items())
        if isinstance(value, list | tuple):
            return any(self.needs_sealing(v, root) for v in value)
        return False

    def seal_tree(self, value: Any, root: str, sealer: Callable[[Any], dict[str, Any]]) -> Any:
        """``value`` (found at path ``root``, e.g. ``input``) with every sensitive value in clear
        replaced by ``sealer(value)``. Envelopes and nulls are left as they are."""
        return self._walk(value, root, None, sealer)

    def _walk(self, value: Any, path: str, key: str | None, sealer: Callable[[Any], dict[str, Any]]) -> Any:
        if value is None or is_sealed(value):
            return value
        if self.sensitive(path, key):
            return sealer(value)
        if isinstance(value, dict):
            return {k: self._walk(v, f"{path}.{k}", str(k), sealer) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._walk(v, path, key, sealer) for v in value]
        return value


@lru_cache(maxsize=64)
def _matcher_for(patterns: tuple[str, ...]) -> _KeyMatcher:
    return _KeyMatcher(patterns)


__all__ = [
    "ALG",
    "DEFAULT_SENSITIVE_KEYS",
    "KEY_BYTES",
    "REDACTED",
    "SEALED",
    "DataKeyDestroyed",
    "DataKeyMissing",
    "Header",
    "SealedError",
    "SealedInvalid",
    "SensitiveRules",
    "aad",
    "contains_sealed",
    "header",
    "is_sealed",
    "key_matches",
    "open_sealed",
    "open_tree",
    "redact",
    "seal",
]
