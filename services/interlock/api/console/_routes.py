"""The console's pages: server-rendered HTML over the same ``interlock.client.Client`` the API uses.

Every page needs a signed-in session (else a redirect to the sign-in page); every form posts
its session's CSRF token; what a role may not do is neither shown nor accepted (the POST
handlers check the role again, whatever the page showed). Live parts of a page fetch a
``…/live`` route that answers the same fragments as JSON (see ``static/console.js``): the run
page on each of the run's Server-Sent Events (the API's ``…/events``), the others by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from interlock.api.auth import Sessions, client_of, decision_signer
from interlock.api.console import _session as session
from interlock.api.console._dag import render_dag
from interlock.api.console._session import Who
from interlock.api.console._view import STATIC, environment, parse_time
from interlock.client import Client, ClientError, NotFound
from interlock.contracts import events as ev
from interlock.core.run import Run
from interlock.core.rundiff import since_time
from interlock.core.workflow import Workflow
from interlock.runtime.apikeys import wrap_key

router = APIRouter(include_in_schema=False)
templates = environment()
PAGE_SIZE = 50
AGENT_STALE_S = 60  # a registration whose heartbeat is older than this is shown as stale
DEAD_LETTER_LIMIT = 200
START_WAIT_S = 5.0
# the run page refreshes on each of these Server-Sent Events (a heartbeat changes nothing it shows)
LIVE_EVENT_TYPES = ",".join(sorted(set(ev.EVENT_TYPES) - {ev.StepHeartbeat.type_name}))
# the pages load only what the package ships, run no inline script and may not be framed
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
EXAMPLE_INPUT = json.dumps({"alert": {"id": "INC-1", "host": "web-7", "service": "checkout",
                                      "symptom": "5xx spike after deploy"}}, indent=2)

ASSETS = {path.name: path for path in STATIC.iterdir() if path.is_file()}  # shipped in the package
MEDIA_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml",
               ".png": "image/png"}


def static_url(name: str) -> str:
    return f"{session.STATIC_PREFIX}/{name}"


def _render(request: Request, name: str, who: Who | None, page: str, status_code: int = 200,
            **context: Any) -> Response:
    template = templates.get_template(name)
    html = template.render(who=who, page=page, csrf=session.csrf_token(request), static=static_url,
                           logout_url=session.LOGOUT_URL, login_url=session.LOGIN_PAGE,
                           flashes=session.pop_flashes(request), may=session.may(who), **context)
    response = HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)
    return session.carry_flashes(request, response)


def _fragment(name: str, who: Who | None, request: Request, **context: Any) -> str:
    return templates.get_template(name).render(who=who, csrf=session.csrf_token(request), may=session.may(who),
                                               static=static_url, **context)


def _back(request: Request, url: str) -> Response:
    return session.carry_flashes(request, RedirectResponse(url, status_code=303))


def _error_page(request: Request, who: Who, title: str, detail: str, status_code: int, back: str = "/runs"
                ) -> Response:
    return _render(request, "error.html", who, "error", status_code=status_code, title=title, detail=detail,
                   back=back)


@router.get(session.STATIC_PREFIX + "/{name}")
async def asset(name: str) -> Response:
    path = ASSETS.get(name)  # only the files shipped: no path from the request reaches the file system
    if path is None:
        return Response("no such asset", status_code=404, media_type="text/plain")
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                        headers={"Cache-Control": "public, max-age=300"})


# -- sign-in ---------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse)
async def home(request: Request) -> Response:
    return _back(request, "/runs")


@router.get(session.LOGIN_PAGE, response_class=HTMLResponse)
async def login_page(request: Request, next: str = "/runs") -> Response:
    return _render(request, "login.html", None, "login", error="", next=session.safe_next(next))


@router.post(session.LOGIN_PAGE, response_class=HTMLResponse)
async def login(request: Request, api_key: str = Form(""), next: str = Form("/runs")) -> Response:
    """The sign-in form: the api's key check and session cookie, answered with pages (the JSON
    sign-in for scripts is ``POST /console/login``)."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        # a form posted from another site would sign this browser in as someone else
        return _render(request, "login.html", None, "login", status_code=403, next="/runs",
                       error=f"sign-in refused: the form came from {origin}, not from this console")
    key = api_key.strip()
    record = await client_of(request).check_api_key(key) if 0 < len(key) <= 512 else None
    if record is None:
        return _render(request, "login.html", None, "login", status_code=401, next=session.safe_next(next),
                       error="That is not a valid API key (unknown, revoked or mistyped).")
    sessions: Sessions = request.app.state.sessions
    cookie, _ = sessions.issue(record, wrap_key(key))
    response = RedirectResponse(session.safe_next(next), status_code=303)
    sessions.set_cookie(response, cookie)
    return response


@router.post(session.LOGOUT_URL)
async def logout(request: Request, who: Who = Depends(session.signed_in)) -> Response:
    response = RedirectResponse(session.LOGIN_PAGE, status_code=303)
    request.app.state.sessions.clear(response)
    return response


# -- runs ------------------------------------------------------------------------------------
def _iso(local: str) -> str | None:
    """A ``datetime-local`` field (UTC) as ISO 8601, None when empty or unreadable."""
    at = parse_time(local.strip()) if local.strip() else None
    return at.isoformat() if at else None


async def _workflow_ids(client: Client) -> list[str]:
    with contextlib.suppress(ClientError):
        return sorted({wf for wf, _ in await client.workflows()})
    return []


async def _runs_rows(client: Client, status: str, workflow: str, q: str, after: str, before: str,
                     cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
    query = q.strip()
    if query:
        with contextlib.suppress(ValueError):  # a run id: that run, if it is this tenant's
            run_id = str(uuid.UUID(query))
            with contextlib.suppress(NotFound):
                return [await client.status(run_id)], None
            return [], None
    return await client.runs_page(status=status or None, workflow_id=workflow or None,
                                  idempotency_key=query or None, started_after=_iso(after),
                                  started_before=_iso(before), cursor=cursor, limit=PAGE_SIZE)


@router.get("/runs", response_class=HTMLResponse)
async def runs_page(request: Request, who: Who = Depends(session.signed_in), status: str = "", workflow: str = "",
                    q: str = "", after: str = "", before: str = "", cursor: str | None = None,
                    start: str = "") -> Response:
    client = session.client(request, who)
    try:
        (rows, next_cursor), workflow_ids = await asyncio.gather(
            _runs_rows(client, status, workflow, q, after, before, cursor), _workflow_ids(client))
    except ValueError as e:  # a cursor that is not ours
        return _error_page(request, who, "Bad cursor", str(e), 400)
    filters = {"status": status, "workflow": workflow, "q": q, "after": after, "before": before,
               "any": any((status, workflow, q, after, before))}
    params = {k: v for k, v in filters.items() if k != "any" and v}
    next_url = "/runs?" + urlencode({**params, "cursor": next_cursor}) if next_cursor else ""
    live_url = None if cursor else "/runs/live" + ("?" + urlencode(params) if params else "")
    return _render(request, "runs.html", who, "runs", runs=rows, next_cursor=next_cursor, next_url=next_url,
                   filters=filters, workflow_ids=workflow_ids, live_url=live_url, start_input=EXAMPLE_INPUT,
                   start_open=bool(start))


@router.get("/runs/live")
async def runs_live(request: Request, who: Who = Depends(session.signed_in_json), status: str = "", workflow: str = "",
                    q: str = "", after: str = "", before: str = "") -> Response:
    rows, _ = await _runs_rows(session.client(request, who), status, workflow, q, after, before, None)
    return JSONResponse({"html": {"runs-rows": _fragment("_runs_rows.html", who, request, runs=rows)},
                         "done": False}, headers={"Cache-Control": "no-store"})


@router.post("/runs/start")
async def start_run(request: Request, who: Who = Depends(session.signed_in),
                    workflow_id: str = Form(...), input: str = Form(""), key: str = Form("")) -> Response:
    session.require(who, "start")
    try:
        value = json.loads(input) if input.strip() else None
    except json.JSONDecodeError as e:
        session.flash(request, "error", f"input is not JSON: {e.msg} at line {e.lineno} column {e.colno}")
        return _back(request, "/runs?start=1")
    client = session.client(request, who)
    try:
        run_id, _ = await client.submit_run(workflow_id, value, key=key.strip() or uuid.uuid4().hex,
                                            requested_by=who.principal)
    except ClientError as e:
        session.flash(request, "error", f"could not start {workflow_id}: {e}")
        return _back(request, "/runs?start=1")
    await _started(client, run_id)
    session.flash(request, "ok", f"run {run_id} of {workflow_id} started")
    return _back(request, f"/runs/{run_id}")


async def _started(client: Client, run_id: str, timeout: float = START_WAIT_S) -> None:
    """Wait until the planner has written the run's first event (so its page has something to
    show); a slow planner only means the page says the run is not there yet."""
    events = client.watch(run_id, timeout=timeout)
    try:
        with contextlib.suppress(TimeoutError, ClientError):
            async with asyncio.timeout(timeout):
                async for _ in events:
                    return
    finally:
        close = getattr(events, "aclose", None)  # an async generator: stop its consumer now
        if close is not None:
            await close()


# -- one run ---------------------------------------------------------------------------------
def _step_views(run: Run, workflow: Workflow | None, projected: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every step of the workflow (reached or not, in topological order), then the run's dynamic
    steps (for-each items, compensations), merged with the projection's attempt history."""
    history = {st["step_id"]: st.get("history") or [] for st in (projected or {}).get("steps", [])}
    order = workflow.topological_order() if workflow else []
    order += [sid for sid in run.steps if sid not in order]
    views = []
    for sid in order:
        state = run.steps.get(sid)
        defined = workflow.steps.get(sid) if workflow else None
        kind = state.step_type if state else (defined.type.value if defined else "job")
        views.append({
            "step_id": sid, "status": state.status if state else "pending", "reached": state is not None,
            "kind": kind, "topic": (state.topic if state else None) or (defined.topic if defined else None),
            "attempt": state.attempt if state else 0, "input": state.input if state else None,
            "output": state.output if state else None, "error": state.error if state else None,
            "decision": state.decision if state else None, "approval": state.approval if state else None,
            "history": history.get(sid, []),
        })
    return views


async def _run_context(client: Client, run_id: str) -> dict[str, Any]:
    run = await client.load_run(run_id)  # the log: the truth, at once
    workflow: Workflow | None = None
    with contextlib.suppress(NotFound):
        workflow = await client.workflow(run.workflow_id, run.workflow_version)
    projected: dict[str, Any] | None = None
    timeline: list[dict[str, Any]] = []
    with contextlib.suppress(NotFound):  # the auditor projects asynchronously: it may lag a moment
        projected, timeline = await asyncio.gather(client.status(run_id), client.timeline(run_id))
    states = {sid: st.status for sid, st in run.steps.items()}
    dag = render_dag(workflow, states, title=f"run {run_id}") if workflow else ""
    return {"run": run, "workflow": workflow, "steps": _step_views(run, workflow, projected), "timeline": timeline,
            "dag": dag, "step_order": workflow.topological_order() if workflow else list(run.steps),
            "chain_ok": projected.get("chain_ok") if projected else None, "admission": run.admission,
            "started_at": projected.get("started_at") if projected else None}


async def _load_run_or_page(request: Request, who: Who, run_id: str) -> dict[str, Any] | Response:
    try:
        return await _run_context(session.client(request, who), run_id)
    except NotFound:
        return _error_page(request, who, "No such run", f"tenant {who.tenant} has no run {run_id}", 404)
    except ClientError as e:
        return _error_page(request, who, "Run unavailable", str(e), 503)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
async def run_page(request: Request, run_id: str, who: Who = Depends(session.signed_in)) -> Response:
    context = await _load_run_or_page(request, who, run_id)
    if isinstance(context, Response):
        return context
    return _render(request, "run.html", who, "run", plan=None, event_types=LIVE_EVENT_TYPES, **context)


@router.get("/runs/{run_id}/live")
async def run_live(request: Request, run_id: str, who: Who = Depends(session.signed_in_json)) -> Response:
    context = await _load_run_or_page(request, who, run_id)
    if isinstance(context, Response):
        return JSONResponse({"html": {}, "done": True, "error": "run unavailable"}, status_code=context.status_code)
    run: Run = context["run"]
    # done once the run has ended and the auditor has projected all of it (the timeline is complete)
    projected_all = bool(context["timeline"]) and context["timeline"][-1]["seq"] >= run.version
    html = {"run-head": _fragment("_run_head.html", who, request, **context), "dag": str(context["dag"]),
            "steps": _fragment("_steps.html", who, request, **context),
            "timeline": _fragment("_timeline.html", who, request, **context)}
    if run.terminal:
        html["run-actions"] = _fragment("_run_actions.html", who, request, plan=None, **context)
    # pause/unpause/resume: which buttons show follows the run's state (their reason fields are
    # re-rendered only when that changes: innerHTML is compared first)
    html["run-control"] = _fragment("_run_control.html", who, request, **context)
    return JSONResponse({"html": html, "done": run.terminal and projected_all, "status": run.status},
                        headers={"Cache-Control": "no-store"})


@router.post("/runs/{run_id}/cancel")
async def cancel_run(request: Request, run_id: str, who: Who = Depends(session.signed_in),
                     reason: str = Form("")) -> Response:
    session.require(who, "cancel")
    try:
        await session.client(request, who).cancel(run_id, reason=reason.strip() or f"cancelled by {who.principal}")
        session.flash(request, "ok", "cancel requested")
    except ClientError as e:
        session.flash(request, "error", f"cancel failed: {e}")
    return _back(request, f"/runs/{run_id}")


@router.post("/runs/{run_id}/rerun", response_class=HTMLResponse)
async def rerun(request: Request, run_id: str, who: Who = Depends(session.signed_in),
                from_step: str = Form(...), dry_run: bool = Form(False)) -> Response:
    session.require(who, "rerun")
    client = session.client(request, who)
    try:
        plan = await client.rerun_plan(run_id, from_step)
        if dry_run:
            context = await _run_context(client, run_id)
            return _render(request, "run.html", who, "run", plan=plan, event_types=LIVE_EVENT_TYPES, **context)
        new_id = await client.rerun(plan, requested_by=who.principal)
    except ClientError as e:  # an unknown step, a run that is gone, the services unreachable
        session.flash(request, "error", f"re-run failed: {e}")
        return _back(request, f"/runs/{run_id}")
    session.flash(request, "ok", f"re-run of {run_id} from {from_step} started")
    return _back(request, f"/runs/{new_id}")


# -- compare runs, failures (issue 17: the pages over the client's run_diff and failures) -------
@router.get("/runs/{run_id}/diff", response_class=HTMLResponse)
async def diff_form(request: Request, run_id: str, against: str = "", who: Who = Depends(session.signed_in)
                    ) -> Response:
    """The run page's "compare with run …" form lands here: on to the diff page."""
    other = against.strip()
    if not other:
        session.flash(request, "error", "name the run to compare with")
        return _back(request, f"/runs/{run_id}")
    return _back(request, f"/runs/{run_id}/diff/{other}")


@router.get("/runs/{run_id}/diff/{other_id}", response_class=HTMLResponse)
async def diff_page(request: Request, run_id: str, other_id: str, who: Who = Depends(session.signed_in)
                    ) -> Response:
    try:
        diff = (await session.client(request, who).run_diff(run_id, other_id)).as_dict()
    except NotFound as e:
        return _error_page(request, who, "No such run", str(e), 404)
    except ClientError as e:
        return _error_page(request, who, "Runs unavailable", str(e), 503)
    return _render(request, "diff.html", who, "run", diff=diff)


@router.get("/workflows/{workflow_id}/failures", response_class=HTMLResponse)
async def failures_page(request: Request, workflow_id: str, since: str = "7d",
                        who: Who = Depends(session.signed_in)) -> Response:
    try:
        after = since_time(since.strip(), datetime.now(UTC)) if since.strip() else None
    except ValueError as e:
        return _error_page(request, who, "Bad time", f"since: {e}", 400, back=request.url.path)
    try:
        groups = await session.client(request, who).failures(workflow_id, since=after)
    except ClientError as e:
        return _error_page(request, who, "Failures unavailable", str(e), 503)
    return _render(request, "failures.html", who, "runs", workflow_id=workflow_id, since=since,
                   groups=[g.as_dict() for g in groups])


# -- approvals -------------------------------------------------------------------------------
async def _approval_items(client: Client) -> list[dict[str, Any]]:
    pending = await client.approvals()

    async def detail(row: dict[str, Any]) -> dict[str, Any]:
        item = dict(row)
        item.update(input=None, asked_by="—", decision=None, step_kind="approval step")
        with contextlib.suppress(ClientError):
            run = await client.load_run(row["run_id"])
            state = run.steps.get(row["step_id"])
            item["asked_by"] = run.requested_by or "—"
            if state is not None:
                item["input"] = state.input
                item["decision"] = state.decision
                item["step_kind"] = ("approval step" if state.step_type == "approval"
                                     else f"{state.topic or 'job'}: held by policy")
                if state.approval is not None and state.approval.expires_at and not item.get("expires_at"):
                    item["expires_at"] = state.approval.expires_at.isoformat()
        return item

    return list(await asyncio.gather(*(detail(row) for row in pending)))


@router.get("/approvals", response_class=HTMLResponse)
async def approvals_page(request: Request, who: Who = Depends(session.signed_in)) -> Response:
    items = await _approval_items(session.client(request, who))
    return _render(request, "approvals.html", who, "approvals", items=items)


@router.get("/approvals/live")
async def approvals_live(request: Request, who: Who = Depends(session.signed_in_json)) -> Response:
    items = await _approval_items(session.client(request, who))
    return JSONResponse({"html": {"approvals-list": _fragment("_approvals_list.html", who, request, items=items)},
                         "done": False}, headers={"Cache-Control": "no-store"})


@router.post("/approvals/{run_id}/{step_id}")
async def decide(request: Request, run_id: str, step_id: str, who: Who = Depends(session.signed_in),
                 decision: str = Form(...), job_hash: str = Form(...),
                 reason: str = Form("")) -> Response:
    session.require(who, "approve")
    client = session.client(request, who)
    reason = reason.strip()
    signer = await decision_signer(request, who)  # the key's own: signed as theirs, never the service's
    if signer is None:
        session.flash(request, "error", "this session cannot sign decisions: sign out and sign in again with your key")
        return _back(request, "/approvals")
    via = f"{session.VIA}:{who.key_id}"
    try:
        if decision == "approve":
            # bound to the job hash the page showed: a job that changed since is not released
            await client.approve(run_id, step_id, job_hash=job_hash, reason=reason, signer=signer, via=via)
            session.flash(request, "ok", f"approved {step_id} of run {run_id}")
        elif decision == "reject":
            if not reason:
                session.flash(request, "error", "a rejection needs a reason")
                return _back(request, "/approvals")
            await client.reject(run_id, step_id, job_hash=job_hash, reason=reason, signer=signer, via=via)
            session.flash(request, "ok", f"rejected {step_id} of run {run_id}")
        else:
            session.flash(request, "error", f"unknown decision {decision!r} (approve or reject)")
    except ClientError as e:  # refused (a changed job, an expired request, not an approver), gone, unreachable
        session.flash(request, "error", f"{decision} failed: {e}")
    return _back(request, "/approvals")


# -- agents, dead letters, policy ------------------------------------------------------------
@router.get("/agents", response_class=HTMLResponse)
async def agents_page(request: Request, who: Who = Depends(session.signed_in)) -> Response:
    registrations = await session.client(request, who).agents()
    stale_before = datetime.now(UTC) - timedelta(seconds=AGENT_STALE_S)
    agents = [{**reg.model_dump(), "stale": reg.last_heartbeat < stale_before} for reg in registrations]
    return _render(request, "agents.html", who, "agents", agents=agents)


def _letter_of(subject: str, who: Who) -> bool:
    """Dead letters are kept per service, not per tenant: a tenant sees those whose original subject
    names it (admin sees every one)."""
    return who.role == "admin" or who.tenant in subject.split(".")


@router.get("/dead-letters", response_class=HTMLResponse)
async def dead_letters_page(request: Request, who: Who = Depends(session.signed_in)) -> Response:
    error = ""
    letters: list[Any] = []
    try:
        letters = [d for d in await session.client(request, who).dead_letters(DEAD_LETTER_LIMIT)
                   if _letter_of(d.subject, who)]
    except ClientError as e:
        error = str(e)
    return _render(request, "dead_letters.html", who, "dead-letters", letters=letters, error=error,
                   limit=DEAD_LETTER_LIMIT)


@router.get("/policy", response_class=HTMLResponse)
async def policy_page(request: Request, who: Who = Depends(session.signed_in)) -> Response:
    client = session.client(request, who)
    try:
        active, history = await asyncio.gather(client.policy_active(), client.policy_history())
    except ClientError as e:
        return _error_page(request, who, "Policy unavailable", str(e), 503)
    return _render(request, "policy.html", who, "policy", active=active, history=history, error="")
