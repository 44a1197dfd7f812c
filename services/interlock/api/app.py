"""The FastAPI application: the ``/api/v1`` routes, console sign-in, the console's pages, problem
documents for every error, a request-body size limit, and the OpenAPI 3.1 document (``/openapi.json``,
interactive at ``/docs``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Form, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from interlock.api import problems
from interlock.api.auth import Principal, Sessions, client_of, current_principal
from interlock.api.console import console_router
from interlock.api.routes import router
from interlock.api.settings import ApiSettings
from interlock.client import Client

log = logging.getLogger(__name__)

TITLE = "Interlock API"
DESCRIPTION = """Start, watch, approve and audit agent workflow runs.

Authenticate with an `X-API-Key` header (`interlock apikeys create --tenant T --role R`, or the admin key
`interlock up` printed); `X-Tenant-ID`, when sent, must be the key's tenant. Every error is
`application/problem+json` (RFC 9457)."""


class BodyLimit:
    """Answers 413 (a problem document) for a request body larger than ``limit`` bytes, whether it
    says so in Content-Length or streams more than it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:  # read the whole (bounded) body first, then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = problems.problem_response(request, 413, "too-large", "Request body too large",
                                             f"the request body exceeds {self.limit} bytes "
                                             f"(INTERLOCK_API_MAX_BODY_BYTES)")
        await response(scope, receive, send)


class SignedIn(BaseModel):
    tenant: str
    principal: str
    role: str
    csrf_token: str


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, with error responses as application/problem+json."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status.startswith(("4", "5")) and "application/json" in content:
                    content[problems.PROBLEM_JSON] = content.pop("application/json")
                    response["content"] = content
    app.openapi_schema = doc
    return doc


def create_app(settings: ApiSettings | None = None, *, client: Client | None = None,
               connect: bool = True) -> FastAPI:
    """The application. ``client``: use this connection (a test's); else, with ``connect``, the
    lifespan connects one with the process's ``INTERLOCK_*`` settings (the api credential)."""
    settings = settings or ApiSettings.load()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = None
        if app.state.client is None and connect:
            owned = await Client.connect(name="interlock-api", patient=True)
            app.state.client = owned
        try:
            yield
        finally:
            if owned is not None:
                await owned.close()
                app.state.client = None

    from importlib.metadata import PackageNotFoundError, version
    try:
        app_version = version("interlock")
    except PackageNotFoundError:
        app_version = "0"
    app = FastAPI(title=TITLE, description=DESCRIPTION, version=app_version, lifespan=lifespan,
                  responses=problems.ERROR_RESPONSES)
    app.state.client = client
    app.state.settings = settings
    app.state.sessions = Sessions(settings.secret(), max_age=settings.session_max_age_s,
                                  secure=settings.secure_cookies)
    problems.install(app)
    app.include_router(router)
    app.include_router(_sign_in_router())
    app.include_router(console_router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _sign_in_router() -> APIRouter:
    sign_in = APIRouter(prefix="/console", tags=["console"], responses=problems.ERROR_RESPONSES)

    @sign_in.post("/login", response_model=SignedIn, summary="Sign in to the console with an API key",
                  responses={303: {"description": "Signed in: on to `next`"}})
    async def login(request: Request, api_key: Annotated[str, Form(min_length=1, max_length=512)],
                    next: Annotated[str | None, Form(max_length=512)] = None) -> Any:
        """Sets an HttpOnly, SameSite=Strict session cookie; the answer carries the session's CSRF
        token (send it as X-CSRF-Token, or the csrf_token form field, with every unsafe request)."""
        record = await client_of(request).check_api_key(api_key)
        if record is None:
            raise problems.ApiProblem(401, "unauthorized", "Unauthorized", "form api_key: not a valid API key "
                                      "(unknown, revoked or mistyped)")
        sessions: Sessions = request.app.state.sessions
        cookie, csrf = sessions.issue(record)
        response: Response
        if next and next.startswith("/") and not next.startswith("//"):  # only back into this site
            response = RedirectResponse(next, status_code=303)
        else:
            response = JSONResponse(SignedIn(tenant=record.tenant, principal=record.principal, role=record.role,
                                             csrf_token=csrf).model_dump())
        sessions.set_cookie(response, cookie)
        return response

    @sign_in.post("/logout", status_code=204, response_class=Response, summary="Sign out (clears the session cookie)")
    async def logout(request: Request) -> Response:
        response = Response(status_code=204)
        request.app.state.sessions.clear(response)
        return response

    @sign_in.get("/session", response_model=SignedIn, summary="Who the session is, and its CSRF token")
    async def session(who: Annotated[Principal, Depends(current_principal)]) -> SignedIn:
        return SignedIn(tenant=who.tenant, principal=who.principal, role=who.role, csrf_token=who.csrf or "")

    return sign_in
