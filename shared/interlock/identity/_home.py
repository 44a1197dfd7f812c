"""The identity home: a directory holding the operator, its accounts and the users they issued.

Layout (directories 0700, secrets 0600; seeds are never logged)::

    operator.jwt  operator.nk           the operator (self-signed) and its seed
    accounts/{name}.json                 an account: public key, revocations (no secrets)
    accounts/{name}.nk  {name}.sk.nk     its identity seed and the signing key's seed
    accounts/{name}.jwt                  its current JWT, signed by the operator
    users/{user public key}.json         who a credential was issued to (no secrets)
    creds/{name}.creds                   issued credentials (unless written elsewhere)
    system.creds                         a system-account user: pushes account JWTs at run time
    resolver/                            the server's account store (``full`` NATS resolver)

One application account holds every tenant for now (``APP_ACCOUNT``); tenants are kept apart by
subject permissions. An account per tenant can come later: everything here takes an account name.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.identity._creds import read_creds, write_creds, write_private
from interlock.identity._jwt import Permissions, account_jwt, operator_jwt, user_jwt
from interlock.identity._keys import KeyKind, NKey
from interlock.identity._roles import ALL_TENANTS, ROLE_NAMES, permissions_for, role
from interlock.identity._signing import Keyring, key_entry, publish_keyring

if TYPE_CHECKING:
    from nats.js import JetStreamContext

log = logging.getLogger(__name__)

OPERATOR_NAME = "interlock"
SYSTEM_ACCOUNT = "SYS"
APP_ACCOUNT = "INTERLOCK"
SYSTEM_USER = "system"
MAX_CONTROL_LINE = 64 * 1024


class IdentityError(RuntimeError):
    """The identity home is unusable, or an issue/revoke/push request cannot be done."""


@dataclass(frozen=True)
class Principal:
    """One issued credential, as ``list()`` shows it (no secrets)."""

    name: str
    role: str
    tenant: str
    public_key: str
    account: str
    issued_at: int
    topics: tuple[str, ...] = ()
    expires: int | None = None
    revoked_at: int | None = None
    creds: str | None = None

    @property
    def inbox_prefix(self) -> str:
        """The inbox prefix this principal must connect with (``inbox_prefix=``)."""
        return p.inbox_prefix(self.public_key)

    @property
    def active(self) -> bool:
        return self.revoked_at is None and (self.expires is None or self.expires > time.time())


@dataclass
class _Account:
    name: str
    public_key: str
    signing_key: str
    revocations: dict[str, int] = field(default_factory=dict)
    jetstream: bool = True


def _expiry(expires: datetime | timedelta | int | None) -> int | None:
    if expires is None:
        return None
    if isinstance(expires, timedelta):
        if expires.total_seconds() <= 0:
            raise IdentityError(f"expires must be in the future, got {expires}")
        return int(time.time() + expires.total_seconds())
    at = int(expires.timestamp()) if isinstance(expires, datetime) else int(expires)
    if at <= time.time():
        raise IdentityError(f"expires must be in the future, got {expires}")
    return at


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _exclusive(method: Callable[Concatenate[IdentityHome, _P], _T]) -> Callable[Concatenate[IdentityHome, _P], _T]:
    """Run ``method`` holding the home's lock."""
    @functools.wraps(method)
    def locked(self: IdentityHome, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        with self._locked():
            return method(self, *args, **kwargs)
    return locked


class IdentityHome:
    """Operator, accounts and issued users in one directory, created on first use."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        with self._locked():
            self._ensure()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (several processes may share a home: the stack, the CLI)."""
        self._dir()
        with (self.root / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, path: Path, text: str) -> None:
        # atomic, so a crash never leaves half a JWT or record; 0600 like the secrets beside them
        write_private(path, text)

    # -- layout ---------------------------------------------------------------------------
    def _dir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    @property
    def resolver_dir(self) -> Path:
        return self._dir("resolver")

    @property
    def system_creds(self) -> Path:
        return self.root / "system.creds"

    def _seed_file(self, name: str) -> Path:
        return self._dir("accounts") / name

    def _load_key(self, path: Path, kind: KeyKind) -> NKey:
        try:
            return NKey.from_seed(path.read_bytes(), expect=kind)
        except OSError as e:
            raise IdentityError(f"{path}: cannot read key ({e.strerror})") from None
        except ValueError as e:
            raise IdentityError(f"{path}: {e}") from None

    def _new_key(self, path: Path, kind: KeyKind) -> NKey:
        key = NKey.generate(kind)
        write_private(path, key.seed)
        return key

    def _ensure(self) -> None:
        self._dir()
        self.root.chmod(0o700)
        op_seed = self.root / "operator.nk"
        if not op_seed.exists():
            log.info("creating identity home in %s", self.root)
            self._new_key(op_seed, KeyKind.OPERATOR)
        for name, jetstream in ((SYSTEM_ACCOUNT, False), (APP_ACCOUNT, True)):
            if not (self._dir("accounts") / f"{name}.json").exists():
                self._create_account(name, jetstream=jetstream)
        if not (self.root / "operator.jwt").exists():
            system = self._account(SYSTEM_ACCOUNT)
            self._write(self.root / "operator.jwt",
                        operator_jwt(self.operator_key, name=OPERATOR_NAME, system_account=system.public_key))
        if not self.system_creds.exists():
            self._issue_user(SYSTEM_ACCOUNT, SYSTEM_USER, lambda key: Permissions(), self.system_creds)

    @property
    def operator_key(self) -> NKey:
        return self._load_key(self.root / "operator.nk", KeyKind.OPERATOR)

    @property
    def operator_jwt(self) -> str:
        return (self.root / "operator.jwt").read_text()

    # -- accounts -------------------------------------------------------------------------
    def _create_account(self, name: str, *, jetstream: bool) -> _Account:
        s.token(name, "account name")
        identity = self._new_key(self._seed_file(f"{name}.nk"), KeyKind.ACCOUNT)
        signing = self._new_key(self._seed_file(f"{name}.sk.nk"), KeyKind.ACCOUNT)
        account = _Account(name, identity.public_key, signing.public_key, jetstream=jetstream)
        self._save_account(account)
        return account

    def _account(self, name: str) -> _Account:
        path = self._dir("accounts") / f"{name}.json"
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise IdentityError(f"{path}: unknown account {name!r} ({e.strerror})") from None
        return _Account(**data)

    def _save_account(self, account: _Account) -> str:
        accounts = self._dir("accounts")
        self._write(accounts / f"{account.name}.json", json.dumps(asdict(account), indent=2, sort_keys=True))
        token = account_jwt(account.public_key, self.operator_key, name=account.name,
                            signing_keys=[account.signing_key], revocations=account.revocations,
                            jetstream=account.jetstream)
        self._write(accounts / f"{account.name}.jwt", token)
        return token

    def account_public_key(self, name: str = APP_ACCOUNT) -> str:
        return self._account(name).public_key

    def account_jwts(self) -> dict[str, str]:
        """Every account's current JWT, by account public key (the resolver's preload)."""
        out: dict[str, str] = {}
        for path in sorted(self._dir("accounts").glob("*.json")):
            account = self._account(path.stem)
            out[account.public_key] = (path.with_suffix(".jwt")).read_text()
        return out

    # -- users ----------------------------------------------------------------------------
    def _issue_user(self, account_name: str, name: str, permissions: Callable[[str], Permissions], out: Path,
                    expires: int | None = None) -> NKey:
        """A new user key, its JWT signed by the account's signing key, written to ``out``.
        ``permissions`` gets the user's public key (its inbox prefix is derived from it)."""
        account = self._account(account_name)
        signer = self._load_key(self._seed_file(f"{account_name}.sk.nk"), KeyKind.ACCOUNT)
        user = NKey.generate(KeyKind.USER)
        token = user_jwt(user.public_key, signer, name=name, permissions=permissions(user.public_key),
                         issuer_account=account.public_key, expires=expires)
        write_creds(out, token, user.seed)
        return user

    @_exclusive
    def issue(self, role_name: str, tenant: str | None = None, topics: Sequence[str] | None = None, *,
              name: str | None = None, expires: datetime | timedelta | int | None = None,
              out: Path | str | None = None) -> Path:
        """Issue a credential of ``role_name`` for ``tenant``; return the ``.creds`` file (mode 0600).

        Services serve every tenant: give them no tenant. ``name`` is the principal (one subject
        token, unique among active credentials): an approver's decisions are recorded under it.
        Default: ``{role}-{tenant}``, or the role for a service. ``topics``:
        the job topics of a worker. ``expires``: a time, a duration from now, or unix seconds.
        A new credential works at once; the server needs nothing pushed or restarted.
        """
        r = role(role_name)
        tenant = tenant or ALL_TENANTS
        principal = name or (r.name if tenant == ALL_TENANTS else f"{r.name}-{tenant}")
        s.token(principal, "principal name")
        # a principal is a name within its tenant (subjects carry both): alice of acme and alice
        # of globex are two credentials
        if any(u.name == principal and u.tenant == tenant and u.active for u in self.list()):
            raise IdentityError(f"an active credential named {principal!r} exists for tenant {tenant}; revoke it "
                                "or pick another name")
        at = _expiry(expires)
        wanted = tuple(topics or ())
        permissions_for(r.name, tenant, principal, "check", wanted)  # bad scope fails before any file is written
        path = Path(out) if out is not None else self._dir("creds") / f"{principal}.creds"
        user = self._issue_user(APP_ACCOUNT, principal,
                                lambda key: permissions_for(r.name, tenant, principal, key, wanted), path, at)
        record = Principal(principal, r.name, tenant, user.public_key, APP_ACCOUNT, int(time.time()),
                           wanted, at, None, str(path))
        self._save_user(record)
        log.info("issued %s credential %r for tenant %s (%s)", r.name, principal, tenant, user.public_key)
        return path

    def get_or_issue(self, role_name: str, tenant: str | None = None, topics: Sequence[str] | None = None, *,
                     name: str | None = None) -> Path:
        """The credential named ``name`` if one is active with this role, tenant and topics and its
        file is still there (a second ``interlock up`` reuses what the first issued); else a new one
        (an active one that no longer fits is revoked first: push the accounts if a server runs)."""
        r = role(role_name)
        tenant = tenant or ALL_TENANTS
        principal = name or (r.name if tenant == ALL_TENANTS else f"{r.name}-{tenant}")
        wanted = tuple(topics or ())
        for u in reversed(self.list()):
            if u.name != principal or u.tenant != tenant or not u.active:
                continue
            if (u.role, u.tenant, u.topics) == (r.name, tenant, wanted) and u.creds and Path(u.creds).is_file():
                return Path(u.creds)
            self.revoke(u.public_key)
        return self.issue(r.name, tenant, wanted, name=principal)

    @_exclusive
    def issue_custom(self, name: str, permissions: Permissions | Callable[[str], Permissions], *,
                     out: Path | str | None = None) -> Path:
        """A credential with explicit ``permissions`` and no role (``Permissions()``: everything; a
        function gets the user's public key, for its inbox prefix), for tools that are not
        Interlock principals (the bench's instruments); recorded with role ``custom``. Never give
        one to a service, worker or person: use :meth:`issue`."""
        s.token(name, "principal name")
        path = Path(out) if out is not None else self._dir("creds") / f"{name}.creds"
        grant = permissions if callable(permissions) else (lambda key: permissions)
        user = self._issue_user(APP_ACCOUNT, name, grant, path)
        self._save_user(Principal(name, "custom", ALL_TENANTS, user.public_key, APP_ACCOUNT, int(time.time()),
                                  (), None, None, str(path)))
        return path

    def _save_user(self, principal: Principal) -> None:
        self._write(self._dir("users") / f"{principal.public_key}.json",
                    json.dumps(asdict(principal), indent=2, sort_keys=True))

    def list(self) -> list[Principal]:
        """Every credential issued from this home (revoked and expired ones included), oldest first."""
        out = []
        for path in self._dir("users").glob("*.json"):
            data = json.loads(path.read_text())
            data["topics"] = tuple(data.get("topics") or ())
            out.append(Principal(**data))
        return sorted(out, key=lambda u: (u.issued_at, u.name))

    def principal(self, user: str, tenant: str | None = None) -> Principal:
        """The credential named ``user`` (of ``tenant``, if given; its latest, if several), or with
        that public key. A name active in several tenants is ambiguous without ``tenant``."""
        matches = [u for u in self.list() if user in (u.name, u.public_key) and tenant in (None, u.tenant)]
        if not matches:
            of = f" for tenant {tenant}" if tenant else ""
            raise IdentityError(f"no credential named {user!r}{of} was issued from {self.root}")
        active = [u for u in matches if u.active]
        if len({u.tenant for u in active}) > 1:
            tenants = ", ".join(sorted({u.tenant for u in active}))
            raise IdentityError(f"{user!r} is active in several tenants ({tenants}): give the tenant or the public key")
        return (active or matches)[-1]

    @_exclusive
    def revoke(self, user: str, tenant: str | None = None) -> Principal:
        """Revoke a credential (by name, of ``tenant`` if given, or by public key) in the account JWT.

        The change reaches a running server only when pushed (:meth:`push`); then the server
        closes the user's connections and refuses it from then on.
        """
        principal = self.principal(user, tenant)
        account = self._account(principal.account)
        now = int(time.time())
        # the server refuses JWTs issued at or before the revocation time
        account.revocations[principal.public_key] = max(now, principal.issued_at)
        self._save_account(account)
        revoked = Principal(**{**asdict(principal), "topics": principal.topics, "revoked_at": now})
        self._save_user(revoked)
        log.info("revoked credential %r (%s)", principal.name, principal.public_key)
        return revoked

    def keyring(self) -> Keyring:
        """The trusted keys: every credential issued from this home, revoked and expired ones kept
        (with when), so commits and approvals they signed before stay verifiable."""
        entries = []
        for u in self.list():
            kind = role(u.role).kind if u.role in ROLE_NAMES else "custom"
            entries.append(key_entry(key_id=u.public_key, principal=u.name, role=u.role, kind=kind, tenant=u.tenant,
                                     valid_from=u.issued_at, revoked_at=u.revoked_at, expires=u.expires))
        return Keyring(entries)

    async def publish_keyring(self, js: JetStreamContext) -> int:
        """Put the keyring into the KV bucket services read it from (``subjects.KEYRING_BUCKET``;
        needs the admin credential). Only changed entries are written. Returns how many."""
        return await publish_keyring(js, self.keyring())

    # -- the server -----------------------------------------------------------------------
    def server_config(self, resolver_dir: Path | str | None = None) -> dict[str, Any]:
        """nats-server settings for operator mode with this home's operator and accounts.

        The ``full`` NATS resolver keeps the account JWTs it is sent in ``resolver/`` (or
        ``resolver_dir``: each node of a cluster needs its own), so an account change pushed at run
        time (``push``) survives a restart; the preload seeds it.
        """
        store = Path(resolver_dir) if resolver_dir is not None else self.resolver_dir
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
        return {
            # a client sends its user JWT in the CONNECT line; the default limit (4 KiB) is too
            # small for a role with many subjects
            "max_control_line": MAX_CONTROL_LINE,
            "operator": str(self.root / "operator.jwt"),
            "system_account": self.account_public_key(SYSTEM_ACCOUNT),
            "resolver": {"type": "full", "dir": str(store), "allow_delete": False,
                         "interval": "2m", "timeout": "1.9s"},
            "resolver_preload": self.account_jwts(),
        }

    def write_server_config(self, path: Path | str, **extra: Any) -> Path:
        """Write :meth:`server_config` (plus ``extra`` settings) as a nats-server config file
        (JSON, which nats-server reads); for servers not started by Interlock (deploy/)."""
        target = Path(path)
        self._write(target, json.dumps({**self.server_config(), **extra}, indent=2))
        return target

    async def push(self, url: str | Sequence[str], *, timeout: float = 5.0,
                   connect_options: Mapping[str, Any] | None = None) -> builtins.list[dict[str, Any]]:
        """Send every account's current JWT to the running server(s) as the system user.

        Returns the server's replies; raises :class:`IdentityError` if one is not ``code`` 200.
        """
        import nats  # here, so that issuing credentials needs no NATS client
        import nats.errors

        read_creds(self.system_creds)  # a missing or damaged file fails here, clearly
        async def quiet(e: Exception) -> None:
            pass

        options: dict[str, Any] = {"allow_reconnect": False, "max_reconnect_attempts": 1, "reconnect_time_wait": 0.1,
                                   "connect_timeout": timeout,
                                   "error_cb": quiet, **dict(connect_options or {})}
        servers = url.split(",") if isinstance(url, str) else list(url)
        try:
            # nats-py retries an unreachable server on its own: bound the whole connect
            nc = await asyncio.wait_for(nats.connect(servers, user_credentials=str(self.system_creds), **options),
                                        timeout * 2)
        except (OSError, TimeoutError, nats.errors.Error) as e:
            detail = str(e) or type(e).__name__
            raise IdentityError(f"cannot reach the server at {url} as the system user: {detail}") from None
        replies: builtins.list[dict[str, Any]] = []
        try:
            for account_key, token in self.account_jwts().items():
                msg = await nc.request(p.SYS_CLAIMS_UPDATE, token.encode(), timeout=timeout)
                reply = json.loads(msg.data or b"{}")
                code = (reply.get("data") or {}).get("code", reply.get("code"))
                if code != 200:
                    error = reply.get("error") or reply
                    raise IdentityError(f"server refused account {account_key[:8]}…: {error}")
                replies.append(reply)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
        return replies
