"""Keys, JWT encoding and decoding, and creds files (no server)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
import time
from pathlib import Path

import nkeys
import pytest

from interlock.identity import (
    CredsError,
    JwtError,
    KeyKind,
    NKey,
    NKeyError,
    Permissions,
    account_jwt,
    decode_jwt,
    format_creds,
    operator_jwt,
    public_key_kind,
    read_creds,
    user_jwt,
    write_creds,
)
from interlock.identity._keys import verify


def _part(token: str, index: int) -> dict[str, object]:
    text = token.split(".")[index]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    return decoded


@pytest.mark.parametrize("kind", list(KeyKind))
def test_generated_keys_have_their_kind_and_round_trip_through_the_seed(kind: KeyKind) -> None:
    key = NKey.generate(kind)
    assert key.public_key.startswith(kind.value) and len(key.public_key) == 56
    assert key.seed.startswith(b"S" + kind.value.encode())
    assert public_key_kind(key.public_key) is kind
    again = NKey.from_seed(key.seed, expect=kind)
    assert again.public_key == key.public_key
    assert key.seed.decode() not in repr(key)  # safe to log
    # nkeys itself agrees on the public key of the seed
    assert nkeys.from_seed(bytearray(key.seed)).public_key.decode() == key.public_key


def test_two_generated_keys_differ() -> None:
    assert NKey.generate(KeyKind.USER).public_key != NKey.generate(KeyKind.USER).public_key


def test_signatures_verify_only_for_the_signed_data_and_key() -> None:
    key, other = NKey.generate(KeyKind.ACCOUNT), NKey.generate(KeyKind.ACCOUNT)
    signature = key.sign(b"payload")
    assert verify(key.public_key, b"payload", signature)
    assert not verify(key.public_key, b"payload!", signature)
    assert not verify(other.public_key, b"payload", signature)


def test_bad_seeds_and_public_keys_are_refused_clearly() -> None:
    with pytest.raises(NKeyError, match="expected a user seed, got a account seed"):
        NKey.from_seed(NKey.generate(KeyKind.ACCOUNT).seed, expect=KeyKind.USER)
    with pytest.raises(NKeyError, match="not a valid nkey seed"):
        NKey.from_seed(b"SUnot-a-seed")
    public = NKey.generate(KeyKind.USER).public_key
    corrupted = public[:-3] + ("A" if public[-3] != "A" else "B") + public[-2:]
    with pytest.raises(NKeyError, match="checksum mismatch"):
        public_key_kind(corrupted)


def _user_token(**kwargs: object) -> tuple[str, NKey, NKey, NKey]:
    account, signing = NKey.generate(KeyKind.ACCOUNT), NKey.generate(KeyKind.ACCOUNT)
    user = NKey.generate(KeyKind.USER)
    perms = Permissions(pub_allow=("a.>",), pub_deny=("a.secret",), sub_allow=("inbox.me.>",), responses=1)
    token = user_jwt(user.public_key, signing, name="alice", permissions=perms, issuer_account=account.public_key,
                     **kwargs)  # type: ignore[arg-type]
    return token, account, signing, user


def test_user_jwt_has_the_nats_v2_shape() -> None:
    expires = int(time.time()) + 3600
    token, account, signing, user = _user_token(expires=expires)
    assert _part(token, 0) == {"typ": "JWT", "alg": "ed25519-nkey"}
    assert not any(part.endswith("=") for part in token.split("."))  # base64url without padding
    claims = decode_jwt(token, expect="user")
    assert claims["iss"] == signing.public_key and claims["sub"] == user.public_key
    assert claims["name"] == "alice" and claims["exp"] == expires and abs(claims["iat"] - time.time()) < 5
    nats = claims["nats"]
    assert nats["type"] == "user" and nats["version"] == 2
    assert nats["issuer_account"] == account.public_key
    assert nats["pub"] == {"allow": ["a.>"], "deny": ["a.secret"]}
    assert nats["sub"] == {"allow": ["inbox.me.>"]}
    assert nats["resp"] == {"max": 1, "ttl": 0}
    assert (nats["subs"], nats["data"], nats["payload"]) == (-1, -1, -1)
    assert Permissions.from_claims(nats).pub_deny == ("a.secret",)


def test_jti_is_the_base32_sha512_256_of_the_standard_claims() -> None:
    token, *_ = _user_token()
    claims = decode_jwt(token)
    standard = {k: claims[k] for k in ("iat", "iss", "name", "sub")}
    digest = hashlib.new("sha512_256", json.dumps(standard, separators=(",", ":")).encode()).digest()
    assert claims["jti"] == base64.b32encode(digest).rstrip(b"=").decode()


def test_signature_is_ed25519_over_header_and_claims_by_the_issuer() -> None:
    token, _, signing, _ = _user_token()
    head, body, sig = token.split(".")
    signature = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    assert verify(signing.public_key, f"{head}.{body}".encode(), signature)


def test_tampered_or_foreign_tokens_are_refused() -> None:
    token, *_ = _user_token()
    head, _, sig = token.split(".")
    claims = _part(token, 1)
    claims["nats"]["pub"] = {"allow": [">"]}  # type: ignore[index]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(JwtError, match="signature does not verify"):
        decode_jwt(f"{head}.{forged}.{sig}")
    with pytest.raises(JwtError, match="three dot-separated parts"):
        decode_jwt("abc")
    with pytest.raises(JwtError, match="expected account claims, got 'user'"):
        decode_jwt(token, expect="account")


def test_user_jwt_must_be_signed_by_an_account_key_about_a_user_key() -> None:
    operator, user = NKey.generate(KeyKind.OPERATOR), NKey.generate(KeyKind.USER)
    with pytest.raises(JwtError, match="account or account signing key expected, got a operator key"):
        user_jwt(user.public_key, operator, name="x", permissions=Permissions())
    with pytest.raises(JwtError, match="is not a user public key"):
        user_jwt(operator.public_key, NKey.generate(KeyKind.ACCOUNT), name="x", permissions=Permissions())


def test_account_jwt_enables_jetstream_and_carries_signing_keys_and_revocations() -> None:
    operator, account, signing = NKey.generate(KeyKind.OPERATOR), *(NKey.generate(KeyKind.ACCOUNT) for _ in range(2))
    revoked = NKey.generate(KeyKind.USER).public_key
    token = account_jwt(account.public_key, operator, name="INTERLOCK", signing_keys=[signing.public_key],
                        revocations={revoked: 1_700_000_000})
    claims = decode_jwt(token, expect="account")
    assert claims["iss"] == operator.public_key and claims["sub"] == account.public_key
    nats = claims["nats"]
    assert nats["version"] == 2
    assert nats["limits"]["mem_storage"] != 0 and nats["limits"]["disk_storage"] != 0
    assert nats["signing_keys"] == [signing.public_key]
    assert nats["revocations"] == {revoked: 1_700_000_000}
    system = decode_jwt(account_jwt(account.public_key, operator, name="SYS", jetstream=False))
    assert "mem_storage" not in system["nats"]["limits"]


def test_operator_jwt_is_self_signed_and_names_the_system_account() -> None:
    operator, system = NKey.generate(KeyKind.OPERATOR), NKey.generate(KeyKind.ACCOUNT)
    claims = decode_jwt(operator_jwt(operator, name="interlock", system_account=system.public_key), expect="operator")
    assert claims["iss"] == claims["sub"] == operator.public_key
    assert claims["nats"]["system_account"] == system.public_key


def test_creds_file_has_the_nats_layout_and_mode_0600(tmp_path: Path) -> None:
    token, _, _, user = _user_token()
    path = write_creds(tmp_path / "sub" / "alice.creds", token, user.seed)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text == format_creds(token, user.seed)
    found = re.match(r"-----BEGIN NATS USER JWT-----\n(\S+)\n------END NATS USER JWT------\n", text)
    assert found is not None and found.group(1) == token
    assert f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n" in text
    jwt, key = read_creds(path)
    assert jwt == token and key.public_key == user.public_key


def test_bad_creds_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CredsError, match=r"missing\.creds: cannot read creds file"):
        read_creds(tmp_path / "missing.creds")
    junk = tmp_path / "junk.creds"
    junk.write_text("hello")
    with pytest.raises(CredsError, match=r"junk\.creds: not a NATS creds file"):
        read_creds(junk)
    with pytest.raises(CredsError, match="user seed"):
        format_creds("x.y.z", NKey.generate(KeyKind.ACCOUNT).seed)


def test_public_surface_is_pinned() -> None:
    import interlock.identity as identity

    assert sorted(identity.__all__) == sorted([
        "ALL_TENANTS", "APP_ACCOUNT", "ROLES", "ROLE_NAMES", "SYSTEM_ACCOUNT", "CredsError", "IdentityError",
        "IdentityHome", "JwtError", "KeyKind", "NKey", "NKeyError", "PermissionDenied", "Permissions", "Principal",
        "Role", "RoleError", "account_jwt", "creds_inbox_prefix", "creds_permissions",
        "decode_jwt", "describe_permission_error",
        "format_creds", "operator_jwt", "permission_error", "permission_table", "permission_violation",
        "permissions_for", "public_key_kind", "read_creds", "role", "subject_matches", "user_jwt", "write_creds",
        # signatures and the keyring
        "BAD_SIGNATURE", "NOT_ENTITLED", "REVOKED_KEY", "UNKNOWN_KEY", "UNSIGNED", "Keyring", "Signer",
        "key_entry", "publish_keyring", "raw_public_key", "verify_signature",
        "write_private",
    ])
    assert all(hasattr(identity, name) for name in identity.__all__)
