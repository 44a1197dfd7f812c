"""Who is calling: an ``X-API-Key`` header, or the console's session cookie (plus a CSRF token for
anything that changes state).

:func:`current_principal` is the dependency every route (and every console page) uses; it
answers 401 for a missing, unknown or revoked key or session, and 403 when ``X-Tenant-ID``
names another tenant than the key's. :func:`allow` adds the role check of one
:class:`~interlock.api.access.Action`.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from fastapi.security import APIKeyCookie, APIKeyHeader
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from interlock.api.access import Action, allows, roles_allowed
from interlock.api.problems import ApiProblem
from interlock.client import Client
from interlock.contracts.messages import ApiKeyRecord
from interlock.identity import Signer
from interlock.runtime.apikeys import signer_of, wrap_key

SESSION_COOKIE = "interlock_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
TENANT_HEADER = "X-Tenant-ID"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key from "
                              "`interlock apikeys create` (or the one `interlock up` printed)")
session_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False,
                              description="The console's session (POST /console/login); unsafe methods also need "
                                          f"the {CSRF_HEADER} header")


@dataclass(frozen=True)
class Principal:
    """Who a request is from: the key's tenant, principal and role; how it signed in; for a
    session, the CSRF token its forms must carry."""

    tenant: str
    principal: str
    role: str
    key_id: str
    via: str  # "api-key" or "session"
    csrf: str | None = None
    signer_wrap: bytes | None = None  # opens the key's own signing key (approvals are signed with it)

    def may(self, action: Action) -> bool:
        return allows(self.role, action)


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(401, "unauthorized", "Unauthorized", detail, headers={"WWW-Authenticate": "X-API-Key"})


class Sessions:
    """Signed session cookies: ``{key id, csrf token}``, valid for ``max_age`` seconds and only
    while the key is not revoked."""

    def __init__(self, secret: str, *, max_age: int, secure: bool) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt="interlock-console-session")
        self.max_age = max_age
        self.secure = secure

    def issue(self, record: ApiKeyRecord, signer_wrap: bytes | None = None) -> tuple[str, str]:
        """A new session for ``record``'s key: (the cookie's value, the session's CSRF token). The
        cookie also carries what opens the key's signing key (derived from the key the person
        signed in with), so approvals in the console are signed as theirs."""
        csrf = secrets.token_urlsafe(24)
        wrap = base64.urlsafe_b64encode(signer_wrap).decode() if signer_wrap else ""
        return self._serializer.dumps({"k": record.key_id, "c": csrf, "w": wrap}), csrf

    def set_cookie(self, response: Response, value: str) -> None:
        response.set_cookie(SESSION_COOKIE, value, max_age=self.max_age, httponly=True, samesite="strict",
                            secure=self.secure, path="/")

    def clear(self, response: Response) -> None:
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=self.secure)

    def read(self, value: str) -> tuple[str, str] | None:
        """(key id, csrf token) of a valid cookie, else None."""
        data = self._load(value)
        return None if data is None else (data["k"], data["c"])

    def signer_wrap(self, value: str) -> bytes | None:
        """What opens the signing key of a valid cookie's key, if it carries it."""
        data = self._load(value)
        wrap = data.get("w") if data is not None else None
        return base64.urlsafe_b64decode(wrap) if isinstance(wrap, str) and wrap else None

    def _load(self, value: str) -> dict[str, Any] | None:
        try:
            data = self._serializer.loads(value, max_age=self.max_age)
        except (SignatureExpired, BadSignature):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("k"), str) or not isinstance(data.get("c"), str):
            return None
        return data


def client_of(request: Request) -> Client:
    client: Client | None = getattr(request.app.state, "client", None)
    if client is None:
        raise ApiProblem(503, "unavailable", "Service unavailable", "the api service is not connected to NATS yet",
                         headers={"Retry-After": "1"})
    return client


async def _csrf_token_of(request: Request) -> str | None:
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    if request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded",
                                                           "multipart/form-data")):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


async def current_principal(request: Request, api_key: Annotated[str | None, Depends(api_key_header)],
                            session: Annotated[str | None, Depends(session_cookie)],
                            tenant: Annotated[str | None, Header(
                                alias=TENANT_HEADER, max_length=128,
                                description="The tenant the request is for: must be the key's (default: the key's)")
                            ] = None) -> Principal:
    """The caller, from ``X-API-Key`` or the session cookie (401 if neither is valid); ``X-Tenant-ID``,
    when given, must be the key's tenant (403)."""
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    client = client_of(request)
    if api_key:
        record = await client.check_api_key(api_key)
        if record is None:
            raise _unauthorized("X-API-Key is not a valid key (unknown, revoked or mistyped)")
        who = Principal(record.tenant, record.principal, record.role, record.key_id, "api-key",
                        signer_wrap=wrap_key(api_key))
    elif session:
        sessions: Sessions = request.app.state.sessions
        read = sessions.read(session)
        record = await client.api_key(read[0]) if read is not None else None
        if read is None or record is None:
            raise _unauthorized("the session has expired or its key was revoked: sign in again")
        if request.method not in SAFE_METHODS:
            given = await _csrf_token_of(request)
            if given is None or not hmac.compare_digest(given, read[1]):
                raise ApiProblem(403, "csrf", "Forbidden", f"missing or wrong CSRF token (send the {CSRF_HEADER} "
                                 f"header or the {CSRF_FIELD} form field of this session)")
        who = Principal(record.tenant, record.principal, record.role, record.key_id, "session", csrf=read[1],
                        signer_wrap=sessions.signer_wrap(session))
    else:
        raise _unauthorized("missing X-API-Key header (or a console session)")
    if tenant is not None and tenant != who.tenant:
        raise ApiProblem(403, "wrong-tenant", "Forbidden",
                         f"{TENANT_HEADER} {tenant!r} is not this key's tenant ({who.tenant!r})")
    request.state.principal = who
    return who


def allow(action: Action) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller, if their role allows ``action`` (else 403 naming the roles that do)."""
    async def check(who: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not who.may(action):
            raise ApiProblem(403, "forbidden", "Forbidden",
                             f"role {who.role!r} may not {action.value}; roles that may: "
                             f"{', '.join(roles_allowed(action))}")
        return who
    check.action = action  # type: ignore[attr-defined]  # read by the route table (interlock.api.routes)
    return check


async def decision_signer(request: Request, who: Principal) -> Signer | None:
    """The signer of ``who``'s approvals: their API key's own signing key, opened by the key they
    presented (or signed in with). None when the key has none or the caller did not present it:
    the API cannot decide for a principal whose key it was not given."""
    record = await client_of(request).api_key(who.key_id)
    return signer_of(record, who.signer_wrap) if record is not None else None


def acting_client(request: Request, who: Principal) -> Client:
    """The service's client acting for ``who``: their tenant, their principal."""
    return client_of(request).with_tenant(who.tenant, who.principal)
