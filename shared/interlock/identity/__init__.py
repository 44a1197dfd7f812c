"""Identity for Interlock: NATS decentralized auth (operator → accounts → users) with nkeys.

- :class:`IdentityHome` — a directory with the operator, the system and application accounts
  and every issued credential; ``issue``, ``list``, ``revoke``, ``push`` (account JWTs to a
  running server), ``server_config`` (nats-server operator mode);
- roles (:data:`ROLES`, :func:`permissions_for`, :func:`permission_table`) — the subject
  permissions of each principal, derived from the contracts;
- keys, JWTs and ``.creds`` files (:class:`NKey`, :func:`decode_jwt`, :func:`write_creds`, …);
- signatures (:class:`Signer`, :func:`verify_signature`) with the principals' own nkeys, and the
  :class:`Keyring` of trusted keys (:meth:`IdentityHome.keyring`, :func:`publish_keyring`);
- :func:`describe_permission_error` — a NATS authorization failure as one clear line.
"""

from interlock.identity._creds import (
    CredsError,
    creds_inbox_prefix,
    creds_permissions,
    format_creds,
    read_creds,
    write_creds,
    write_private,
)
from interlock.identity._errors import (
    PermissionDenied,
    describe_permission_error,
    permission_error,
    permission_violation,
)
from interlock.identity._home import (
    APP_ACCOUNT,
    SYSTEM_ACCOUNT,
    IdentityError,
    IdentityHome,
    Principal,
)
from interlock.identity._jwt import (
    JwtError,
    Permissions,
    account_jwt,
    operator_jwt,
    subject_matches,
    user_jwt,
)
from interlock.identity._jwt import decode as decode_jwt
from interlock.identity._keys import KeyKind, NKey, NKeyError, public_key_kind
from interlock.identity._roles import (
    ALL_TENANTS,
    ROLE_NAMES,
    ROLES,
    Role,
    RoleError,
    permission_table,
    permissions_for,
    role,
)
from interlock.identity._signing import (
    BAD_SIGNATURE,
    NOT_ENTITLED,
    REVOKED_KEY,
    UNKNOWN_KEY,
    UNSIGNED,
    Keyring,
    Signer,
    key_entry,
    publish_keyring,
    raw_public_key,
    verify_signature,
)

__all__ = [
    "ALL_TENANTS",
    "APP_ACCOUNT",
    "BAD_SIGNATURE",
    "NOT_ENTITLED",
    "REVOKED_KEY",
    "ROLES",
    "ROLE_NAMES",
    "SYSTEM_ACCOUNT",
    "UNKNOWN_KEY",
    "UNSIGNED",
    "CredsError",
    "IdentityError",
    "IdentityHome",
    "JwtError",
    "KeyKind",
    "Keyring",
    "NKey",
    "NKeyError",
    "PermissionDenied",
    "Permissions",
    "Principal",
    "Role",
    "RoleError",
    "Signer",
    "account_jwt",
    "creds_inbox_prefix",
    "creds_permissions",
    "decode_jwt",
    "describe_permission_error",
    "format_creds",
    "key_entry",
    "operator_jwt",
    "permission_error",
    "permission_table",
    "permission_violation",
    "permissions_for",
    "public_key_kind",
    "publish_keyring",
    "raw_public_key",
    "read_creds",
    "role",
    "subject_matches",
    "user_jwt",
    "verify_signature",
    "write_creds",
    "write_private",
]
