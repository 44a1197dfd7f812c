"""Ed25519 signatures with the principals' own keys, and the keyring that says whose key is whose.

Every principal (service instance, worker, person) already holds an nkey seed in its ``.creds``
file; its 32 raw bytes are an Ed25519 private key. A :class:`Signer` signs with it through
``cryptography``; its key id is the nkey public key (``U…``), so the keyring, the NATS
credential list and the signatures all name a key the same way.

The :class:`Keyring` holds every issued key (``KeyEntry``: principal, role, tenant, valid from,
revoked at) and answers "may this key sign this, then?" for commits (:meth:`Keyring.commit_problem`)
and approvals (:meth:`Keyring.approval_problem`). The identity home keeps it
(:meth:`IdentityHome.keyring`), ``interlock up`` and ``interlock provision`` publish it to the KV
bucket ``subjects.KEYRING_BUCKET``, services watch that bucket.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nkeys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from interlock.contracts import authorship as a
from interlock.contracts import subjects as s
from interlock.identity._creds import read_creds
from interlock.identity._keys import NKey, NKeyError, _decode_public

if TYPE_CHECKING:
    from nats.js import JetStreamContext

try:  # nats is there wherever the bucket is read; issuing keys needs no NATS client
    from nats.js.errors import KeyNotFoundError
except ImportError:  # pragma: no cover
    KeyNotFoundError = LookupError  # type: ignore[misc,assignment]

# Problem kinds (shared with the verifier's report)
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
UNKNOWN_KEY = "unknown_key"
REVOKED_KEY = "revoked_key"
NOT_ENTITLED = "not_entitled"


class Signer:
    """Signs with one principal's Ed25519 key. ``repr`` never shows the key."""

    __slots__ = ("_private", "key_id")

    def __init__(self, key: NKey) -> None:
        _, raw = nkeys.decode_seed(bytearray(key.seed))
        self._private = Ed25519PrivateKey.from_private_bytes(bytes(raw))
        self.key_id = key.public_key

    @classmethod
    def from_creds(cls, path: Path | str) -> Signer:
        """The signer of the principal whose ``.creds`` file this is."""
        _, key = read_creds(Path(path))
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of ``data`` (64 bytes)."""
        return self._private.sign(data)

    def sign_b64(self, data: bytes) -> str:
        return a.b64url(self.sign(data))

    def __repr__(self) -> str:
        return f"Signer({self.key_id})"


def raw_public_key(key_id: str) -> bytes:
    """The 32-byte Ed25519 public key an nkey public key (``U…``) encodes (checksum checked)."""
    _, raw = _decode_public(key_id)
    return raw


_PUBLIC_KEYS: dict[str, Ed25519PublicKey] = {}


def verify_signature(key_id: str, data: bytes, signature: bytes | str) -> bool:
    """True if ``signature`` (raw, or base64url text) is ``key_id``'s Ed25519 signature of ``data``.
    Never raises on malformed input: a bad key id or signature is simply not valid."""
    try:
        sig = a.b64url_decode(signature) if isinstance(signature, str) else signature
        public = _PUBLIC_KEYS.get(key_id)
        if public is None:
            public = Ed25519PublicKey.from_public_bytes(raw_public_key(key_id))
            if len(_PUBLIC_KEYS) < 100_000:
                _PUBLIC_KEYS[key_id] = public
        public.verify(sig, data)
    except (InvalidSignature, NKeyError, ValueError, TypeError):
        return False
    return True


def key_entry(*, key_id: str, principal: str, role: str, kind: str, tenant: str, valid_from: int,
              revoked_at: int | None = None, expires: int | None = None) -> a.KeyEntry:
    """A keyring entry for ``key_id`` (its raw public key filled in)."""
    public = Ed25519PublicKey.from_public_bytes(raw_public_key(key_id))
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return a.KeyEntry(key_id=key_id, public_key=a.b64url(raw), principal=principal, role=role, kind=kind,
                      tenant=tenant, valid_from=valid_from, revoked_at=revoked_at, expires=expires)


class Keyring:
    """Trusted keys by key id, and the rules for what each may sign."""

    def __init__(self, entries: Iterable[a.KeyEntry] = ()) -> None:
        self._keys: dict[str, a.KeyEntry] = {e.key_id: e for e in entries}

    # -- contents ----------------------------------------------------------------------------
    def get(self, key_id: str) -> a.KeyEntry | None:
        return self._keys.get(key_id)

    def put(self, entry: a.KeyEntry) -> None:
        self._keys[entry.key_id] = entry

    def remove(self, key_id: str) -> None:
        self._keys.pop(key_id, None)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def entries(self) -> list[a.KeyEntry]:
        return sorted(self._keys.values(), key=lambda e: (e.valid_from, e.principal, e.key_id))

    def document(self) -> a.KeyringDocument:
        return a.KeyringDocument(generated_at=datetime.now(UTC), keys=self.entries())

    def to_json(self) -> str:
        return self.document().model_dump_json(indent=2)

    @classmethod
    def from_document(cls, document: a.KeyringDocument) -> Keyring:
        return cls(document.keys)

    @classmethod
    def from_json(cls, text: str | bytes) -> Keyring:
        return cls.from_document(a.KeyringDocument.model_validate_json(text))

    @classmethod
    def load(cls, path: Path | str) -> Keyring:
        """A keyring file (``interlock audit keyring > keyring.json``); a clear error if it is not one."""
        try:
            return cls.from_json(Path(path).read_bytes())
        except OSError as e:
            raise ValueError(f"{path}: cannot read keyring ({e.strerror})") from None
        except ValueError as e:
            raise ValueError(f"{path}: not an Interlock keyring: {str(e).splitlines()[0]}") from None

    # -- rules -------------------------------------------------------------------------------
    def _signer_problem(self, key_id: str | None, signature: str | None, data: bytes, at: float | None
                        ) -> tuple[str, str] | tuple[None, a.KeyEntry]:
        if not key_id or not signature:
            return UNSIGNED, "no signature"
        entry = self._keys.get(key_id)
        if entry is None:
            return UNKNOWN_KEY, f"signed by key {key_id[:12]}…, which is not in the keyring"
        if not verify_signature(key_id, data, signature):
            return BAD_SIGNATURE, f"the signature is not {entry.principal}'s ({key_id[:12]}…) over this content"
        if not entry.valid_at(at):
            when = datetime.fromtimestamp(at, UTC).isoformat() if at is not None else "now"
            return REVOKED_KEY, (f"key of {entry.principal} ({key_id[:12]}…) was not valid at {when} "
                                 f"(valid from {entry.valid_from}, revoked at {entry.revoked_at}, "
                                 f"expires {entry.expires})")
        return None, entry

    def commit_problem(self, subject: str, envelopes: Sequence[Mapping[str, Any]], key_id: str | None,
                       signature: str | None, at: float | None) -> tuple[str, str] | None:
        """Why a commit with these envelopes, signer and signature must not be trusted (kind,
        message), or None. ``at``: when it was stored (unix seconds), for revocation."""
        data = a.canonical(a.commit_statement(subject, envelopes))
        kind, found = self._signer_problem(key_id, signature, data, at)
        if kind is not None:
            return kind, str(found)
        assert isinstance(found, a.KeyEntry)
        refused = sorted({str(e.get("type")) for e in envelopes if not a.may_write(found.role, e)})
        if refused:
            return NOT_ENTITLED, f"{found.principal} (role {found.role}) may not write {', '.join(refused)}"
        return None

    def approval_problem(self, signed: a.SignedApproval, *, principal: str | None = None,
                         at: float | None = None) -> tuple[str, str] | None:
        """Why a signed approval must not be trusted, or None: the signature is the key's, the key
        is valid at ``at`` (default: the statement's time) and belongs to a person of the
        statement's tenant named as its principal (and ``principal``, when given)."""
        statement = signed.statement
        if at is None:
            try:
                at = datetime.fromisoformat(statement.at).timestamp()
            except ValueError:
                return BAD_SIGNATURE, f"the statement's time {statement.at!r} is not RFC 3339"
        kind, found = self._signer_problem(signed.key_id, signed.signature, a.approval_bytes(statement), at)
        if kind is not None:
            return kind, str(found)
        assert isinstance(found, a.KeyEntry)
        if found.principal != statement.principal or found.tenant not in (statement.tenant, "*"):
            return NOT_ENTITLED, (f"the key belongs to {found.principal} of tenant {found.tenant}, the statement "
                                  f"is by {statement.principal} of tenant {statement.tenant}")
        if principal is not None and principal != statement.principal:
            return NOT_ENTITLED, (f"the decision was sent by {principal}, the statement is signed as "
                                  f"{statement.principal}")
        if found.kind != "person":
            return NOT_ENTITLED, f"{found.principal} is a {found.kind} (role {found.role}): only people approve"
        return None


def read_keyring_entries(values: Iterable[bytes]) -> list[a.KeyEntry]:
    """Entries from the bucket's values, skipping any that is not one (the caller logs)."""
    out = []
    for value in values:
        try:
            out.append(a.KeyEntry.model_validate_json(value))
        except ValueError:
            continue
    return out


def dumps_entry(entry: a.KeyEntry) -> bytes:
    return json.dumps(entry.model_dump(mode="json"), sort_keys=True).encode()


async def publish_keyring(js: JetStreamContext, keyring: Keyring) -> int:
    """Put every entry whose stored value differs into ``subjects.KEYRING_BUCKET`` (admin only)."""
    kv = await js.key_value(s.KEYRING_BUCKET)
    written = 0
    for entry in keyring.entries():
        value = dumps_entry(entry)
        try:
            current = await kv.get(entry.key_id)
        except KeyNotFoundError:
            current = None
        if current is None or current.value != value:
            await kv.put(entry.key_id, value)
            written += 1
    return written


__all__ = [
    "BAD_SIGNATURE",
    "NOT_ENTITLED",
    "REVOKED_KEY",
    "UNKNOWN_KEY",
    "UNSIGNED",
    "Keyring",
    "Signer",
    "dumps_entry",
    "key_entry",
    "publish_keyring",
    "raw_public_key",
    "read_keyring_entries",
    "verify_signature",
]
