"""NATS nkeys: generating, loading and using operator, account and user key pairs.

Signing goes through the ``nkeys`` package. ``nkeys`` (Python) has no key generator, so a seed
is 32 bytes from ``os.urandom`` encoded by ``nkeys.encode_seed``; and it cannot verify with a
public key alone, so verification uses PyNaCl's Ed25519 ``VerifyKey`` -- the library ``nkeys``
itself signs with -- after decoding the public key's base32 and checking its CRC.
"""

from __future__ import annotations

import base64
import enum
import os
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.signing
import nkeys


class NKeyError(ValueError):
    """A seed or public key is malformed or of the wrong kind."""


class KeyKind(enum.Enum):
    """The nkey roles Interlock uses; the value is the public key's first letter."""

    OPERATOR = "O"
    ACCOUNT = "A"
    USER = "U"

    @property
    def prefix_byte(self) -> int:
        return _PREFIX_BYTES[self]


_PREFIX_BYTES = {
    KeyKind.OPERATOR: nkeys.PREFIX_BYTE_OPERATOR,
    KeyKind.ACCOUNT: nkeys.PREFIX_BYTE_ACCOUNT,
    KeyKind.USER: nkeys.PREFIX_BYTE_USER,
}


@dataclass(frozen=True)
class NKey:
    """One key pair. ``repr`` never shows the seed, so logging a key cannot leak it."""

    kind: KeyKind
    public_key: str
    _pair: nkeys.KeyPair = field(repr=False, compare=False)

    @classmethod
    def generate(cls, kind: KeyKind) -> NKey:
        """A fresh key pair of ``kind`` from 32 random bytes."""
        return cls.from_seed(nkeys.encode_seed(os.urandom(32), kind.prefix_byte))

    @classmethod
    def from_seed(cls, seed: bytes | str, expect: KeyKind | None = None) -> NKey:
        """Load a key pair from its seed (``S…``); ``expect`` checks its kind."""
        raw = seed.encode() if isinstance(seed, str) else bytes(seed)
        try:
            pair = nkeys.from_seed(bytearray(raw.strip()))
            public = pair.public_key.decode()
        except Exception as e:  # nkeys raises its own error types, and binascii errors on bad base32
            raise NKeyError(f"not a valid nkey seed ({e})") from None
        kind = public_key_kind(public)
        if expect is not None and kind is not expect:
            raise NKeyError(f"expected a {expect.name.lower()} seed, got a {kind.name.lower()} seed")
        return cls(kind, public, pair)

    @property
    def seed(self) -> bytes:
        """The secret seed. Store it only in files with mode 0600; never log it."""
        seed: bytes = bytes(self._pair.seed)
        return seed

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of ``data`` (64 bytes)."""
        signature: bytes = self._pair.sign(data)
        return signature


def _decode_public(public_key: str) -> tuple[int, bytes]:
    try:
        raw = base64.b32decode(public_key.encode() + b"=" * (-len(public_key) % 8))
    except Exception:
        raise NKeyError(f"{public_key[:8]}…: not a base32 nkey public key") from None
    if len(raw) != 35:
        raise NKeyError(f"{public_key[:8]}…: an nkey public key has 35 bytes, this one {len(raw)}")
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if nkeys.crc16(bytearray(body)) != crc:
        raise NKeyError(f"{public_key[:8]}…: checksum mismatch (not an nkey public key)")
    return body[0], body[1:]


def public_key_kind(public_key: str) -> KeyKind:
    """The kind of an nkey public key (checks its encoding and checksum)."""
    prefix, _ = _decode_public(public_key)
    for kind, byte in _PREFIX_BYTES.items():
        if byte == prefix:
            return kind
    raise NKeyError(f"{public_key[:8]}…: not an operator, account or user public key")


def verify(public_key: str, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` is the Ed25519 signature of ``data`` by ``public_key``."""
    _, raw = _decode_public(public_key)
    try:
        nacl.signing.VerifyKey(raw).verify(data, signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True
