"""The web console's routes (pages, assets): mounted by :mod:`interlock.api.app`.

A placeholder until the console lands: ``/`` says where the API and its documentation are.
Pages use :func:`interlock.api.auth.current_principal` (session cookie or X-API-Key) and, for
forms, the session's CSRF token (:attr:`interlock.api.auth.Principal.csrf`).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

console_router = APIRouter(include_in_schema=False)


@console_router.get("/", response_class=HTMLResponse)
async def index() -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Interlock</title></head><body>"
            "<h1>Interlock</h1><p>The HTTP API is at <a href='/api/v1'>/api/v1</a>; "
            "its interactive documentation at <a href='/docs'>/docs</a>.</p></body></html>")
