"""NATS JWT v2: operator, account and user claims, signed with nkeys.

The shapes follow nats-io/jwt (v2): a JWS-like ``header.claims.signature`` with header
``{"typ":"JWT","alg":"ed25519-nkey"}``, each part base64url without padding, the signature an
Ed25519 signature by the issuer's nkey over ``header.claims``. ``jti`` is, as nats computes it,
the unpadded base32 SHA-512/256 of the standard claims (without ``jti``). The server is what
verifies these for real; :func:`decode` verifies too, for tests and for reading back our own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from interlock.identity._keys import KeyKind, NKey, NKeyError, public_key_kind, verify

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
VERSION = 2
NO_LIMIT = -1
# JetStream is enabled for an account only by non-zero storage limits (-1: unlimited)
JETSTREAM_UNLIMITED = {"mem_storage": NO_LIMIT, "disk_storage": NO_LIMIT, "streams": NO_LIMIT,
                       "consumer": NO_LIMIT}


class JwtError(ValueError):
    """A token is malformed, has a bad signature, or is not the kind of claims expected."""


@dataclass(frozen=True)
class Permissions:
    """Subject permissions of a user: what it may publish and subscribe to.

    ``responses`` lets a responder publish one reply to the reply subject of each request it
    received (``allow_responses``), so services need no publish right on others' inboxes.
    """

    pub_allow: tuple[str, ...] = ()
    pub_deny: tuple[str, ...] = ()
    sub_allow: tuple[str, ...] = ()
    sub_deny: tuple[str, ...] = ()
    responses: int = 0

    def claims(self) -> dict[str, Any]:
        def perm(allow: Sequence[str], deny: Sequence[str]) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            if allow:
                out["allow"] = list(allow)
            if deny:
                out["deny"] = list(deny)
            return out
        body: dict[str, Any] = {"pub": perm(self.pub_allow, self.pub_deny),
                                "sub": perm(self.sub_allow, self.sub_deny)}
        if self.responses:
            body["resp"] = {"max": self.responses, "ttl": 0}
        return body

    def allows_publish(self, subject: str) -> bool:
        """Whether the server would let this user publish to ``subject`` (deny wins; no allow
        list means everything is allowed)."""
        return _allowed(subject, self.pub_allow, self.pub_deny)

    def allows_subscribe(self, subject: str) -> bool:
        """Whether the server would let this user subscribe to ``subject`` (a literal or wildcard)."""
        return _allowed(subject, self.sub_allow, self.sub_deny)

    @classmethod
    def from_claims(cls, nats: Mapping[str, Any]) -> Permissions:
        pub, sub = nats.get("pub") or {}, nats.get("sub") or {}
        resp = nats.get("resp") or {}
        return cls(tuple(pub.get("allow") or ()), tuple(pub.get("deny") or ()),
                   tuple(sub.get("allow") or ()), tuple(sub.get("deny") or ()), int(resp.get("max") or 0))


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` matches one token, a final ``>`` one or more.
    A wildcard in ``subject`` matches only the same wildcard in ``pattern`` (or a ``>``)."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have):
            return False
        if token == "*":
            if have[i] == ">":
                return False
            continue
        if token != have[i]:
            return False
    return len(have) == len(want)


def _allowed(subject: str, allow: Sequence[str], deny: Sequence[str]) -> bool:
    if any(subject_matches(d, subject) for d in deny):
        return False
    return not allow or any(subject_matches(a, subject) for a in allow)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _jti(standard: Mapping[str, Any]) -> str:
    digest = hashlib.new("sha512_256", _compact(standard)).digest()
    return base64.b32encode(digest).rstrip(b"=").decode()


@dataclass
class _Standard:
    subject: str
    name: str
    expires: int | None = None
    issued_at: int = field(default_factory=lambda: int(time.time()))

    def fields(self, issuer: str) -> dict[str, Any]:
        # the order nats-io/jwt marshals ClaimsData in (aud, exp, jti, iat, iss, name, nbf, sub)
        out: dict[str, Any] = {}
        if self.expires:
            out["exp"] = self.expires
        out["iat"] = self.issued_at
        out["iss"] = issuer
        if self.name:
            out["name"] = self.name
        out["sub"] = self.subject
        return out


def encode(standard: _Standard, nats: Mapping[str, Any], issuer: NKey) -> str:
    """Sign ``nats`` claims about ``standard.subject`` with ``issuer``; return the JWT."""
    fields = standard.fields(issuer.public_key)
    jti = _jti(fields)
    claims: dict[str, Any] = {}
    if "exp" in fields:
        claims["exp"] = fields.pop("exp")
    claims["jti"] = jti
    claims.update(fields)
    claims["nats"] = {**nats, "version": VERSION}
    signing_input = f"{_b64(_compact(HEADER))}.{_b64(_compact(claims))}"
    return f"{signing_input}.{_b64(issuer.sign(signing_input.encode()))}"


def decode(token: str, *, expect: str | None = None) -> dict[str, Any]:
    """Parse and verify a JWT; return its claims. ``expect``: "operator", "account" or "user"."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtError("a JWT has three dot-separated parts")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, UnicodeDecodeError) as e:
        raise JwtError(f"a JWT part is not base64url JSON ({e})") from None
    if not isinstance(header, dict) or str(header.get("typ", "")).upper() != "JWT" \
            or header.get("alg") != HEADER["alg"]:
        raise JwtError(f"unsupported JWT header {header!r} (want {HEADER})")
    if not isinstance(claims, dict) or not isinstance(claims.get("nats"), dict):
        raise JwtError("JWT claims lack the 'nats' object")
    issuer = claims.get("iss")
    try:
        valid = isinstance(issuer, str) and verify(issuer, f"{parts[0]}.{parts[1]}".encode(), signature)
    except NKeyError as e:
        raise JwtError(f"JWT issuer is not an nkey public key ({e})") from None
    if not valid:
        raise JwtError("JWT signature does not verify with its issuer key")
    kind = claims["nats"].get("type")
    if expect is not None and kind != expect:
        raise JwtError(f"expected {expect} claims, got {kind!r}")
    return claims


def operator_jwt(operator: NKey, *, name: str, system_account: str) -> str:
    """The operator's self-signed JWT, naming the system account."""
    _expect(operator, KeyKind.OPERATOR, "operator")
    return encode(_Standard(operator.public_key, name),
                  {"system_account": system_account, "type": "operator"}, operator)


def account_jwt(account: str, operator: NKey, *, name: str, signing_keys: Sequence[str] = (),
                revocations: Mapping[str, int] | None = None, jetstream: bool = True,
                issued_at: int | None = None) -> str:
    """An account JWT signed by the operator.

    ``signing_keys`` may sign this account's users (their JWTs then carry ``issuer_account``);
    ``revocations`` maps a user public key to a unix time: that user's JWTs issued at or before
    it are refused, and its connections are closed when the server gets the new account JWT.
    """
    _expect(operator, KeyKind.OPERATOR, "operator")
    if public_key_kind(account) is not KeyKind.ACCOUNT:
        raise JwtError(f"{account[:8]}… is not an account public key")
    limits: dict[str, Any] = {"subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT, "imports": NO_LIMIT,
                              "exports": NO_LIMIT, "wildcards": True, "conn": NO_LIMIT, "leaf": NO_LIMIT}
    if jetstream:
        limits.update(JETSTREAM_UNLIMITED)
    nats: dict[str, Any] = {"limits": limits, "default_permissions": {"pub": {}, "sub": {}}}
    if signing_keys:
        nats["signing_keys"] = list(signing_keys)
    if revocations:
        nats["revocations"] = dict(sorted(revocations.items()))
    nats["type"] = "account"
    standard = _Standard(account, name)
    if issued_at is not None:
        standard.issued_at = issued_at
    return encode(standard, nats, operator)


def user_jwt(user: str, signer: NKey, *, name: str, permissions: Permissions, issuer_account: str | None = None,
             expires: int | None = None, tags: Sequence[str] = ()) -> str:
    """A user JWT signed by its account, or by an account signing key (then give ``issuer_account``)."""
    _expect(signer, KeyKind.ACCOUNT, "account or account signing")
    if public_key_kind(user) is not KeyKind.USER:
        raise JwtError(f"{user[:8]}… is not a user public key")
    nats: dict[str, Any] = {**permissions.claims(), "subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT}
    if issuer_account and issuer_account != signer.public_key:
        nats["issuer_account"] = issuer_account
    if tags:
        nats["tags"] = [t.lower() for t in tags]
    nats["type"] = "user"
    return encode(_Standard(user, name, expires), nats, signer)


def _expect(key: NKey, kind: KeyKind, what: str) -> None:
    if key.kind is not kind:
        raise JwtError(f"{what} key expected, got a {key.kind.name.lower()} key")
