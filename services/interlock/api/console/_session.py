"""The console's view of the api service's session: who is signed in, their client, CSRF, roles.

The api service owns the session (``POST /console/login`` checks an API key and sets the signed,
HttpOnly, SameSite=Strict cookie that carries the principal and its CSRF token); this module
only reads it through the api's own dependencies, so there is one session and one key check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, Response

from interlock.client import Client

LOGIN_PAGE = "/login"
LOGIN_URL = "/console/login"
LOGOUT_URL = "/console/logout"
STATIC_PREFIX = "/static/console"
VIA = "console"  # recorded in approval events: the decision came through the web console
FLASH_COOKIE = "il_console_flash"

# what each console action needs (the API enforces the same roles on its own routes)
ACTIONS: dict[str, frozenset[str]] = {
    "start": frozenset({"operator", "admin"}),
    "cancel": frozenset({"operator", "admin"}),
    "rerun": frozenset({"operator", "admin"}),
    "approve": frozenset({"approver", "admin"}),
}


@dataclass(frozen=True)
class Who:
    """The signed-in principal."""

    principal: str
    tenant: str
    role: str


@dataclass(frozen=True)
class May:
    """What the signed-in role may do: the pages show only these controls."""

    start: bool = False
    cancel: bool = False
    rerun: bool = False
    approve: bool = False

    @property
    def operate(self) -> bool:
        return self.cancel or self.rerun


def may(who: Who | None) -> May:
    if who is None:
        return May()
    return May(**{action: who.role in roles for action, roles in ACTIONS.items()})


def require(who: Who, action: str) -> None:
    """403 unless ``who``'s role may ``action`` (whatever the page showed)."""
    if who.role not in ACTIONS[action]:
        raise HTTPException(403, f"role {who.role} may not {action} (needs {' or '.join(sorted(ACTIONS[action]))})")


class SignInRequired(Exception):
    """Raised by :func:`signed_in`; the app turns it into a redirect to the sign-in page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def safe_next(url: str) -> str:
    """Only a local path may follow sign-in (no open redirect)."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/runs"


def current(request: Request) -> Who | None:
    """The session's principal, None when nobody is signed in."""
    raise NotImplementedError  # wired to the api's session once it lands


async def signed_in(request: Request) -> Who:
    """Dependency: the signed-in principal, else a redirect to the sign-in page."""
    who = current(request)
    if who is None:
        raise SignInRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return who


def client(request: Request, who: Who) -> Client:
    """The shared client acting for ``who`` (their tenant; commands attributed to them)."""
    raise NotImplementedError


def csrf_token(request: Request) -> str:
    raise NotImplementedError


def check_csrf(request: Request, token: str) -> None:
    raise NotImplementedError


# -- one-shot messages after a redirect (a cookie: only this origin can set it) ---------------
def flash(request: Request, kind: str, text: str) -> None:
    request.state.flash_out = [*getattr(request.state, "flash_out", []), (kind, text[:500])]


def pop_flashes(request: Request) -> list[tuple[str, str]]:
    try:
        raw = json.loads(request.cookies.get(FLASH_COOKIE) or "[]")
    except ValueError:
        return []
    request.state.flash_seen = True
    return [(str(k), str(t)) for k, t in raw if k in ("ok", "error", "info")] if isinstance(raw, list) else []


def carry_flashes(request: Request, response: Response) -> Response:
    """Set (after a POST) or clear (once shown) the flash cookie on ``response``."""
    out: list[Any] = getattr(request.state, "flash_out", [])
    if out:
        response.set_cookie(FLASH_COOKIE, json.dumps(out), max_age=60, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
    elif getattr(request.state, "flash_seen", False) and FLASH_COOKIE in request.cookies:
        response.delete_cookie(FLASH_COOKIE, httponly=True, samesite="strict")
    return response
