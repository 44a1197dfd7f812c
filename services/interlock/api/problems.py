"""Every error as ``application/problem+json`` (RFC 9457): status, title, detail naming the field or
cause, and the request path as ``instance``. Bad input is a 4xx, NATS trouble a 503, never a 500
for anything a caller sent."""

from __future__ import annotations

import logging
from typing import Any

import nats.errors
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from interlock.client import ClientError, NotFound, Refused, Unavailable, WorkflowInvalid
from interlock.contracts.subjects import SubjectError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://interlock.dev/problems/"


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = Field(description="A URI naming the kind of problem")
    title: str
    status: int
    detail: str = Field(description="What went wrong, naming the field or cause")
    instance: str = Field(default="", description="The request path")
    errors: list[dict[str, Any]] | None = Field(default=None, description="Each invalid field: field, message")


class ApiProblem(Exception):
    """Raise to answer with a problem document."""

    def __init__(self, status: int, kind: str, title: str, detail: str, *, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail = status, kind, title, detail
        self.errors = errors
        self.headers = headers


def problem_response(request: Request, status: int, kind: str, title: str, detail: str, *,
                     errors: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = Problem(type=TYPE_BASE + kind, title=title, status=status, detail=detail, instance=request.url.path,
                   errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, media_type=PROBLEM_JSON,
                        headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(x) for x in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        where, rest = parts[0], parts[1:]
        return f"{where} {'.'.join(rest)}" if rest else where
    return ".".join(parts) or "(request)"


_HTTP_TITLES = {404: ("not-found", "Not found"), 405: ("method-not-allowed", "Method not allowed"),
                401: ("unauthorized", "Unauthorized"), 403: ("forbidden", "Forbidden"),
                413: ("too-large", "Request body too large"), 400: ("bad-request", "Bad request")}


def install(app: FastAPI) -> None:
    """Register the exception handlers that turn every failure into a problem document."""

    @app.exception_handler(ApiProblem)
    async def _problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return problem_response(request, exc.status, exc.kind, exc.title, exc.detail, errors=exc.errors,
                                headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(e.get("loc", ())), "message": str(e.get("msg", "invalid"))} for e in exc.errors()]
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            first = next(e for e in exc.errors() if e.get("type") == "json_invalid")
            where = first.get("ctx", {}).get("error", "")
            return problem_response(request, 400, "malformed-json", "Malformed JSON",
                                    f"the request body is not valid JSON{f': {where}' if where else ''}")
        first = errors[0] if errors else {"field": "(request)", "message": "invalid"}
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return problem_response(request, 422, "invalid-request", "Invalid request",
                                f"{first['field']}: {first['message']}{more}", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind, title = _HTTP_TITLES.get(exc.status_code, ("http-error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such route: {request.method} {request.url.path}"
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem_response(request, exc.status_code, kind, title, detail,
                                headers=dict(exc.headers) if exc.headers else None)

    @app.exception_handler(WorkflowInvalid)
    async def _workflow_invalid(request: Request, exc: WorkflowInvalid) -> JSONResponse:
        problems = [str(p) for p in getattr(exc, "problems", [])] or [str(exc)]
        return problem_response(request, 422, "invalid-workflow", "Invalid workflow", "; ".join(problems)[:2000],
                                errors=[{"field": "body source", "message": p} for p in problems])

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return problem_response(request, 404, "not-found", "Not found", str(exc))

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        return problem_response(request, 409, "refused", "Refused", str(exc))

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return problem_response(request, 503, "unavailable", "Service unavailable", str(exc),
                                headers={"Retry-After": "1"})

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        return problem_response(request, 400, "bad-request", "Bad request", str(exc))

    @app.exception_handler(SubjectError)
    async def _subject(request: Request, exc: SubjectError) -> JSONResponse:
        return problem_response(request, 400, "bad-request", "Bad request", str(exc))

    async def _nats(request: Request, exc: Exception) -> JSONResponse:
        log.warning("api: NATS failure on %s %s: %r", request.method, request.url.path, exc)
        return problem_response(request, 503, "unavailable", "Service unavailable",
                                f"NATS is unavailable: {exc or type(exc).__name__}", headers={"Retry-After": "1"})

    for kind in (nats.errors.Error, TimeoutError, ConnectionError):
        app.add_exception_handler(kind, _nats)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": description, "content": {PROBLEM_JSON: {}}}
    for status, description in (
        (400, "Malformed JSON or a bad value"), (401, "Missing or bad API key or session"),
        (403, "The key's role or tenant does not allow this"), (404, "Unknown run, workflow, step or key"),
        (409, "Refused by the service (e.g. the run has ended)"), (413, "Request body too large"),
        (422, "Invalid request: the field is named"), (503, "NATS or a service is unavailable"))
}
"""The error responses every route may give, for the OpenAPI document."""
