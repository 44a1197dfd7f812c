"""The console's use of the api service's session: who is signed in, their client, roles, flashes.

The api service owns the session and the key check (:mod:`interlock.api.auth`): a signed,
HttpOnly, SameSite=Strict cookie naming the API key and the session's CSRF token, which
:func:`~interlock.api.auth.current_principal` checks on every unsafe request (form field
``csrf_token``). The console adds only what a browser needs: a redirect to the sign-in page
instead of a 401, sign-in and sign-out forms that land on pages, and one-shot messages.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request, Response

from interlock.api.access import Action, roles_allowed
from interlock.api.auth import Principal, acting_client, current_principal, session_cookie
from interlock.api.problems import ApiProblem
from interlock.client import Client

Who = Principal

LOGIN_PAGE = "/login"
LOGOUT_URL = "/logout"
STATIC_PREFIX = "/static/console"
VIA = "console"  # recorded in approval events: the decision came through the web console
FLASH_COOKIE = "interlock_console_flash"

# each console action and the API action (role table: interlock.api.access) it needs
ACTIONS: dict[str, Action] = {
    "start": Action.OPERATE,
    "cancel": Action.OPERATE,
    "rerun": Action.OPERATE,
    "approve": Action.APPROVE,
    "intervene": Action.OPERATE,  # pause, unpause, resume a run; retry, skip a step (issue 17)
    "feedback": Action.FEEDBACK,
    "dead_letters": Action.ADMIN,
}


class May:
    """What the signed-in role may do: the pages show only these controls (and the POST
    handlers check again with :func:`require`)."""

    def __init__(self, who: Who | None) -> None:
        for name, action in ACTIONS.items():
            setattr(self, name, who is not None and who.may(action))

    @property
    def operate(self) -> bool:
        return bool(getattr(self, "cancel", False) or getattr(self, "rerun", False))


def may(who: Who | None) -> May:
    return May(who)


def require(who: Who, action: str) -> None:
    """403 unless ``who``'s role may ``action``, whatever the page showed."""
    needed = ACTIONS[action]
    if not who.may(needed):
        raise ApiProblem(403, "forbidden", "Forbidden", f"role {who.role!r} may not {action.replace('_', ' ')}; "
                         f"roles that may: {', '.join(roles_allowed(needed))}")


def safe_next(url: str) -> str:
    """Only a local path may follow sign-in (no open redirect)."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/runs"


async def signed_in(request: Request) -> Who:
    """Dependency of the pages: the signed-in principal (the api's session check, CSRF included
    for a POST); nobody signed in: a redirect to the sign-in page, back here after."""
    try:
        return await current_principal(request, None, await session_cookie(request))
    except ApiProblem as e:
        if e.status != 401:
            raise
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target = LOGIN_PAGE if request.method != "GET" else f"{LOGIN_PAGE}?next={here}"
        raise ApiProblem(303, "sign-in", "See Other", "sign in first", headers={"Location": target}) from None


async def signed_in_json(request: Request) -> Who:
    """Dependency of the live fragments: the principal, or a 401 (the page reloads into the sign-in)."""
    return await current_principal(request, None, await session_cookie(request))


def client(request: Request, who: Who) -> Client:
    """The api's client acting for ``who`` (their tenant; commands attributed to their principal)."""
    return acting_client(request, who)


def csrf_token(request: Request) -> str:
    who: Principal | None = getattr(request.state, "principal", None)
    return (who.csrf or "") if who is not None else ""


# -- one-shot messages after a redirect (a cookie: only this origin can set it) ---------------
def flash(request: Request, kind: str, text: str) -> None:
    request.state.flash_out = [*getattr(request.state, "flash_out", []), (kind, text[:500])]


def pop_flashes(request: Request) -> list[tuple[str, str]]:
    try:
        raw = json.loads(request.cookies.get(FLASH_COOKIE) or "[]")
    except ValueError:
        return []
    request.state.flash_seen = True
    if not isinstance(raw, list):
        return []
    return [(str(k), str(t)) for k, t in (item for item in raw if isinstance(item, list) and len(item) == 2)
            if k in ("ok", "error", "info")]


def carry_flashes(request: Request, response: Response) -> Response:
    """Set (after a POST) or clear (once shown) the flash cookie on ``response``."""
    out: list[Any] = getattr(request.state, "flash_out", [])
    secure = bool(request.app.state.sessions.secure)
    if out:
        response.set_cookie(FLASH_COOKIE, json.dumps(out), max_age=60, httponly=True, samesite="strict",
                            secure=secure, path="/")
    elif getattr(request.state, "flash_seen", False) and FLASH_COOKIE in request.cookies:
        response.delete_cookie(FLASH_COOKIE, path="/", httponly=True, samesite="strict", secure=secure)
    return response
