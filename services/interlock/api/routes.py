"""The ``/api/v1`` routes. Each names the :class:`~interlock.api.access.Action` it needs (also in the
OpenAPI document as ``x-interlock-action``) and acts through the client for the caller's tenant
and principal."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from interlock.api import models as m
from interlock.api.access import Action
from interlock.api.auth import Principal, acting_client, allow, decision_signer
from interlock.api.problems import ERROR_RESPONSES, ApiProblem
from interlock.client import TERMINAL_EVENTS, Client, NotFound
from interlock.contracts.messages import (
    AgentRegistration,
    ApiKeyRecord,
    BreakerChange,
    BreakerState,
    DeadLetter,
    Rollout,
    ScheduleRow,
)
from interlock.core.rundiff import since_time

PREFIX = "/api/v1"
MAX_PAGE = 500
START_WAIT_S = 5.0  # how long POST .../runs waits for the planner to start the run before answering
RunId = Annotated[str, Path(pattern=m.TOKEN, max_length=128, description="A run id")]
WorkflowId = Annotated[str, Path(pattern=m.TOKEN, max_length=256, description="A workflow id")]
StepId = Annotated[str, Path(min_length=1, max_length=256, description="A step id")]
Topic = Annotated[str, Path(pattern=m.TOPIC, max_length=256, description="A job topic, e.g. llm.summarize")]

router = APIRouter(prefix=PREFIX, responses=ERROR_RESPONSES)


def route(method: str, path: str, action: Action, *, openapi_extra: dict[str, Any] | None = None,
          **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``router.<method>(path)`` that requires ``action`` of the caller's role."""
    extra = {**(openapi_extra or {}), "x-interlock-action": action.value}
    return router.api_route(path, methods=[method], dependencies=[Depends(allow(action))], openapi_extra=extra,
                            **kwargs)


def Caller(action: Action) -> Any:  # capitalised: reads as a type in the signatures below
    return Depends(allow(action))


def route_actions() -> dict[tuple[str, str], Action]:
    """(method, path) -> the action each route needs: the table the tests check every role against."""
    table: dict[tuple[str, str], Action] = {}
    for r in router.routes:
        if isinstance(r, APIRoute):
            action = Action((r.openapi_extra or {})["x-interlock-action"])
            for method in r.methods or ():
                table[(method, r.path)] = action
    return table


def _links(run_id: str) -> m.RunLinks:
    base = f"{PREFIX}/workflow-runs/{run_id}"
    return m.RunLinks(self=base, timeline=f"{base}/timeline", events=f"{base}/events")


# -- runs ---------------------------------------------------------------------------------------
@route("POST", "/workflows/{workflow_id}/runs", Action.OPERATE, status_code=201, response_model=m.RunAccepted,
       responses={200: {"model": m.RunAccepted, "description": "The Idempotency-Key had started this run already"}},
       summary="Start a run")
async def start_run(request: Request, response: Response, workflow_id: WorkflowId, body: m.StartRun,
                    who: Principal = Caller(Action.OPERATE),
                    idempotency_key: Annotated[str | None, Header(
                        alias="Idempotency-Key", min_length=1, max_length=200,
                        description="The same key never starts two runs: a repeat answers 200 with the same run "
                                    "(default: a new random key)")] = None) -> m.RunAccepted:
    client = acting_client(request, who)
    key = idempotency_key or uuid.uuid4().hex
    # answered once the run exists (or after a few seconds, the trigger being durable): a GET of
    # the Location right after finds it
    run_id, created = await client.submit_run(workflow_id, body.input, key=key, version=body.version,
                                              requested_by=who.principal, wait_started=START_WAIT_S,
                                              priority=body.priority)
    links = _links(run_id)
    if created:
        response.headers["Location"] = links.self
    else:
        response.status_code = 200
    return m.RunAccepted(run_id=run_id, workflow_id=workflow_id, idempotency_key=key, created=created, links=links)


@route("GET", "/workflow-runs", Action.READ, response_model=m.RunsPage, summary="List runs, newest first")
async def list_runs(request: Request, who: Principal = Caller(Action.READ),
                    workflow: Annotated[str | None, Query(pattern=m.TOKEN, max_length=256)] = None,
                    status: Annotated[str | None, Query(pattern=m.TOKEN, max_length=32,
                                                        description="running, succeeded, failed, …")] = None,
                    idempotency_key: Annotated[str | None, Query(max_length=256)] = None,
                    started_after: Annotated[str | None, Query(max_length=64, description="ISO 8601")] = None,
                    started_before: Annotated[str | None, Query(max_length=64, description="ISO 8601")] = None,
                    cursor: Annotated[str | None, Query(max_length=1024)] = None,
                    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> m.RunsPage:
    client = acting_client(request, who)
    try:
        rows, next_cursor = await client.runs_page(status=status, workflow_id=workflow,
                                                   idempotency_key=idempotency_key, started_after=started_after,
                                                   started_before=started_before, cursor=cursor, limit=limit)
    except ValueError as e:
        raise ApiProblem(422, "invalid-request", "Invalid request", f"query cursor: {e}") from None
    return m.RunsPage(items=[m.RunRow(**row) for row in rows], next_cursor=next_cursor)


async def _run_detail(client: Client, run_id: str) -> m.RunDetail:
    try:
        return m.RunDetail(**await client.status(run_id))
    except NotFound:
        pass
    run = await client.load_run(run_id)  # not projected yet: the log has it (NotFound -> 404)
    return m.RunDetail(run_id=run_id, tenant=run.tenant, workflow_id=run.workflow_id,
                       workflow_version=run.workflow_version, status=run.status, idempotency_key=run.idempotency_key,
                       requested_by=run.requested_by, rerun_of=run.rerun_of, projected=False,
                       steps=[{"step_id": sid, "status": st.status} for sid, st in run.steps.items()])


@route("GET", "/workflow-runs/{run_id}", Action.READ, response_model=m.RunDetail, summary="A run and its steps")
async def get_run(request: Request, run_id: RunId, who: Principal = Caller(Action.READ)) -> m.RunDetail:
    return await _run_detail(acting_client(request, who), run_id)


@route("GET", "/workflow-runs/{run_id}/timeline", Action.READ, response_model=m.TimelinePage,
       summary="A run's events, summarised, in order")
async def timeline(request: Request, run_id: RunId, who: Principal = Caller(Action.READ),
                   limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
                   cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$",
                                                       description="A previous page's next_cursor")] = None
                   ) -> m.TimelinePage:
    rows = await acting_client(request, who).timeline(run_id, after_seq=int(cursor or 0), limit=limit)
    next_cursor = str(rows[-1]["seq"]) if len(rows) >= limit else None
    return m.TimelinePage(items=rows, next_cursor=next_cursor)


@route("GET", "/workflow-runs/{run_id}/events", Action.READ, summary="A run's events, live (Server-Sent Events)",
       response_class=EventSourceResponse,
       responses={200: {"description": "One `event:` per run event (its type), `id:` its seq, `data:` the envelope; "
                                       "`event: end` after the terminal one",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def events(request: Request, run_id: RunId, who: Principal = Caller(Action.READ),
                 last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", pattern=r"^[0-9]{1,18}$")] = None
                 ) -> EventSourceResponse:
    client = acting_client(request, who)
    await _run_detail(client, run_id)  # 404 before the stream starts
    after = int(last_event_id or 0)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async for envelope in client.watch(run_id, heartbeats=True):
            seq = int(envelope.get("seq") or 0)
            if seq > after:
                yield ServerSentEvent(data=json.dumps(envelope, separators=(",", ":")), event=str(envelope["type"]),
                                      id=str(seq))
            if envelope["type"] in TERMINAL_EVENTS:
                yield ServerSentEvent(data=json.dumps({"run_id": run_id, "final": envelope["type"]}), event="end")
                return

    return EventSourceResponse(stream(), ping=15)


@route("POST", "/workflow-runs/{run_id}/rerun", Action.OPERATE, response_model=m.RerunResult,
       summary="Re-run from a step (dry run: only the plan)")
async def rerun(request: Request, run_id: RunId, body: m.Rerun, who: Principal = Caller(Action.OPERATE)
                ) -> m.RerunResult:
    client = acting_client(request, who)
    plan = await client.rerun_plan(run_id, body.from_step)
    new_id = None if body.dry_run else await client.rerun(plan, requested_by=who.principal)
    return m.RerunResult(source_run_id=run_id, from_step=body.from_step, dry_run=body.dry_run, run_id=new_id,
                         steps=[m.RerunStep(step_id=sid, runs_again=again) for sid, again in plan.steps()])


# -- compare runs (issue 17) --------------------------------------------------------------------
async def _diff(request: Request, who: Principal, run_a: str, run_b: str) -> m.RunDiff:
    result = await acting_client(request, who).run_diff(run_a, run_b)
    return m.RunDiff(**result.as_dict())


@route("GET", "/workflow-runs/{run_id}/diff/{other_id}", Action.READ, response_model=m.RunDiff,
       summary="Compare two runs step by step; the first divergence is marked")
async def run_diff(request: Request, run_id: RunId, other_id: Annotated[str, Path(
                       pattern=m.TOKEN, max_length=128, description="The run to compare with")],
                   who: Principal = Caller(Action.READ)) -> m.RunDiff:
    return await _diff(request, who, run_id, other_id)


@route("GET", "/workflow-runs/{run_id}/diff", Action.READ, response_model=m.RunDiff,
       summary="Compare a run with ?against=RUN step by step")
async def run_diff_against(request: Request, run_id: RunId,
                           against: Annotated[str, Query(pattern=m.TOKEN, max_length=128,
                                                         description="The run to compare with")],
                           who: Principal = Caller(Action.READ)) -> m.RunDiff:
    return await _diff(request, who, run_id, against)


@route("GET", "/workflows/{workflow_id}/failures", Action.READ, response_model=m.FailuresPage,
       summary="Failed runs grouped by the step and error where they broke, most frequent first")
async def failures(request: Request, workflow_id: WorkflowId, who: Principal = Caller(Action.READ),
                   since: Annotated[str | None, Query(max_length=64, description="7d, 12h, 30m or ISO 8601")] = None,
                   limit: Annotated[int, Query(ge=1, le=10_000, description="Failed runs looked at")] = 1000
                   ) -> m.FailuresPage:
    try:
        after = None if since is None else since_time(since, datetime.now(UTC))
    except ValueError as e:
        raise ApiProblem(422, "invalid-request", "Invalid request", f"query since: {e}") from None
    groups = await acting_client(request, who).failures(workflow_id, since=after, limit=limit)
    return m.FailuresPage(items=[m.FailureGroupRow(**g.as_dict()) for g in groups])


@route("POST", "/workflow-runs/{run_id}/cancel", Action.OPERATE, response_model=m.CommandResult,
       summary="Cancel a run")
async def cancel(request: Request, run_id: RunId, body: m.Cancel, who: Principal = Caller(Action.OPERATE)
                 ) -> m.CommandResult:
    reply = await acting_client(request, who).cancel(run_id, reason=body.reason)
    return m.CommandResult(ok=reply.ok, detail=reply.detail)


# -- intervening in a run, feedback (issue 17) ----------------------------------------------------
def _result(reply: Any) -> m.CommandResult:
    return m.CommandResult(ok=reply.ok, detail=reply.detail)


@route("POST", "/workflow-runs/{run_id}/steps/{step_id}/retry", Action.OPERATE, response_model=m.CommandResult,
       summary="Retry a failed, timed-out or waiting step now, optionally with a new input")
async def retry_step(request: Request, run_id: RunId, step_id: StepId, body: m.RetryStep,
                     who: Principal = Caller(Action.OPERATE)) -> m.CommandResult:
    client, via = acting_client(request, who), f"api:{who.key_id}"
    if "input" in body.model_fields_set:
        return _result(await client.retry_step(run_id, step_id, reason=body.reason, input=body.input, via=via))
    return _result(await client.retry_step(run_id, step_id, reason=body.reason, via=via))


@route("POST", "/workflow-runs/{run_id}/steps/{step_id}/skip", Action.OPERATE, response_model=m.CommandResult,
       summary="Complete a step with a supplied output, so its dependants proceed")
async def skip_step(request: Request, run_id: RunId, step_id: StepId, body: m.SkipStep,
                    who: Principal = Caller(Action.OPERATE)) -> m.CommandResult:
    return _result(await acting_client(request, who).skip_step(run_id, step_id, output=body.output,
                                                               reason=body.reason, via=f"api:{who.key_id}"))


@route("POST", "/workflow-runs/{run_id}/resume", Action.OPERATE, response_model=m.CommandResult,
       summary="Resume a failed run from its failed steps (the same run)")
async def resume_run(request: Request, run_id: RunId, body: m.Intervene, who: Principal = Caller(Action.OPERATE)
                     ) -> m.CommandResult:
    return _result(await acting_client(request, who).resume_run(run_id, reason=body.reason, via=f"api:{who.key_id}"))


@route("POST", "/workflow-runs/{run_id}/pause", Action.OPERATE, response_model=m.CommandResult,
       summary="Pause dispatching (jobs already out finish)")
async def pause_run(request: Request, run_id: RunId, body: m.Intervene, who: Principal = Caller(Action.OPERATE)
                    ) -> m.CommandResult:
    return _result(await acting_client(request, who).pause_run(run_id, reason=body.reason, via=f"api:{who.key_id}"))


@route("POST", "/workflow-runs/{run_id}/unpause", Action.OPERATE, response_model=m.CommandResult,
       summary="Dispatch a paused run's jobs again")
async def unpause_run(request: Request, run_id: RunId, body: m.Intervene, who: Principal = Caller(Action.OPERATE)
                      ) -> m.CommandResult:
    return _result(await acting_client(request, who).unpause_run(run_id, reason=body.reason,
                                                                 via=f"api:{who.key_id}"))


@route("POST", "/workflow-runs/{run_id}/steps/{step_id}/feedback", Action.FEEDBACK, status_code=201,
       response_model=m.CommandResult, summary="Rate or correct a step's output (bound to the output's hash)")
async def give_feedback(request: Request, run_id: RunId, step_id: StepId, body: m.Feedback,
                        who: Principal = Caller(Action.FEEDBACK)) -> m.CommandResult:
    if body.score is None and "correction" not in body.model_fields_set and not body.note.strip():
        raise ApiProblem(422, "invalid-request", "Invalid request", "body: give a score, a correction or a note")
    client, via = acting_client(request, who), f"api:{who.key_id}"
    if "correction" in body.model_fields_set:
        reply = await client.give_feedback(run_id, step_id, score=body.score, correction=body.correction,
                                           note=body.note, output_hash=body.output_hash, via=via)
    else:
        reply = await client.give_feedback(run_id, step_id, score=body.score, note=body.note,
                                           output_hash=body.output_hash, via=via)
    return _result(reply)


@route("GET", "/workflow-runs/{run_id}/feedback", Action.READ, response_model=m.FeedbackPage,
       summary="Feedback on a run's step outputs, oldest first")
async def run_feedback(request: Request, run_id: RunId, who: Principal = Caller(Action.READ)) -> m.FeedbackPage:
    return m.FeedbackPage(items=await acting_client(request, who).feedback(run_id=run_id))


@route("GET", "/workflows/{workflow_id}/feedback", Action.READ, summary="A workflow's feedback as JSON lines",
       response_class=Response, responses={200: {"content": {"application/x-ndjson": {}}}})
async def export_feedback(request: Request, workflow_id: WorkflowId, who: Principal = Caller(Action.READ)
                          ) -> Response:
    rows = await acting_client(request, who).feedback(workflow_id=workflow_id, limit=100_000)
    text = "".join(json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n" for row in rows)
    return Response(text, media_type="application/x-ndjson")


# -- approvals ----------------------------------------------------------------------------------
@route("GET", "/approvals", Action.READ, response_model=m.ApprovalsPage, summary="Pending approvals, oldest first")
async def approvals(request: Request, who: Principal = Caller(Action.READ)) -> m.ApprovalsPage:
    rows = await acting_client(request, who).approvals()
    return m.ApprovalsPage(items=[m.PendingApprovalRow(**row) for row in rows])


async def _decide(request: Request, who: Principal, run_id: str, step_id: str, grant: bool, reason: str,
                  job_hash: str | None) -> m.CommandResult:
    client = acting_client(request, who)
    signer = await decision_signer(request, who)
    if signer is None:
        raise ApiProblem(409, "no-signing-key", "Conflict",
                         f"API key {who.key_id} cannot sign approvals (it has no signing key, or this session "
                         "did not sign in with the key): sign in again, or create a new key")
    via = f"api:{who.key_id}"
    if grant:
        reply = await client.approve(run_id, step_id, job_hash=job_hash, reason=reason, signer=signer, via=via)
    else:
        reply = await client.reject(run_id, step_id, job_hash=job_hash, reason=reason, signer=signer, via=via)
    return m.CommandResult(ok=reply.ok, detail=reply.detail)


@route("POST", "/approvals/{run_id}/{step_id}/approve", Action.APPROVE, response_model=m.CommandResult,
       summary="Approve, as the key's principal")
async def approve(request: Request, run_id: RunId, step_id: StepId, body: m.Approve,
                  who: Principal = Caller(Action.APPROVE)) -> m.CommandResult:
    return await _decide(request, who, run_id, step_id, True, body.reason, body.job_hash)


@route("POST", "/approvals/{run_id}/{step_id}/reject", Action.APPROVE, response_model=m.CommandResult,
       summary="Reject, as the key's principal (the run fails)")
async def reject(request: Request, run_id: RunId, step_id: StepId, body: m.Reject,
                 who: Principal = Caller(Action.APPROVE)) -> m.CommandResult:
    return await _decide(request, who, run_id, step_id, False, body.reason, body.job_hash)


# -- workflows ----------------------------------------------------------------------------------
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/plain")
_APPLY_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": m.ApplyWorkflow.model_json_schema()},
    "application/yaml": {"schema": {"type": "string", "description": "The workflow's YAML"}}}}}


@route("POST", "/workflows", Action.ADMIN, status_code=201, response_model=m.WorkflowApplied,
       responses={200: {"model": m.WorkflowApplied, "description": "This version was registered already"}},
       openapi_extra=_APPLY_BODY, summary="Register a workflow version from its YAML (JSON or the YAML itself)")
async def apply_workflow(request: Request, response: Response, who: Principal = Caller(Action.ADMIN)
                         ) -> m.WorkflowApplied:
    """The body is ``{"source": "<YAML>"}``, or the YAML itself with ``Content-Type: application/yaml``
    (``curl --data-binary @workflow.yaml``)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    if kind in YAML_TYPES:
        try:
            body = m.ApplyWorkflow(source=raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiProblem(400, "bad-request", "Bad request", "body: the YAML is not UTF-8 text") from None
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
    else:
        try:
            body = m.ApplyWorkflow.model_validate_json(raw)
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
    workflow, created = await acting_client(request, who).apply_workflow(body.source, filename=body.filename,
                                                                         files=body.files)
    if not created:
        response.status_code = 200
    return m.WorkflowApplied(workflow_id=workflow.id, version=workflow.version, created=created)


@route("GET", "/workflows", Action.READ, response_model=list[m.WorkflowSummary], summary="Registered workflows")
async def list_workflows(request: Request, who: Principal = Caller(Action.READ)) -> list[m.WorkflowSummary]:
    versions: dict[str, list[str]] = {}
    for wf_id, version in await acting_client(request, who).workflows():
        versions.setdefault(wf_id, []).append(version)
    return [m.WorkflowSummary(workflow_id=k, versions=v) for k, v in sorted(versions.items())]


@route("GET", "/workflows/{workflow_id}/versions", Action.READ, response_model=m.WorkflowVersions,
       summary="A workflow's registered versions")
async def workflow_versions(request: Request, workflow_id: WorkflowId, who: Principal = Caller(Action.READ)
                            ) -> m.WorkflowVersions:
    client = acting_client(request, who)
    latest = await client.workflow(workflow_id)  # 404 for an unknown workflow
    versions = [v for wf_id, v in await client.workflows() if wf_id == workflow_id]
    return m.WorkflowVersions(workflow_id=workflow_id, versions=versions, latest=latest.version)


# -- policy -------------------------------------------------------------------------------------
def _revision(rev: Any) -> m.PolicyRevisionOut:
    return m.PolicyRevisionOut(**dataclasses.asdict(rev))


@route("GET", "/policy", Action.READ, response_model=m.PolicyRevisionOut, summary="The active policy bundle")
async def policy_active(request: Request, who: Principal = Caller(Action.READ)) -> m.PolicyRevisionOut:
    return _revision(await acting_client(request, who).policy_active())


@route("GET", "/policy/history", Action.READ, response_model=list[m.PolicyRevisionOut],
       summary="Every published bundle, oldest first")
async def policy_history(request: Request, who: Principal = Caller(Action.READ)) -> list[m.PolicyRevisionOut]:
    return [_revision(r) for r in await acting_client(request, who).policy_history()]


async def _eval(request: Request, who: Principal, body: m.PolicyEval, explain: bool) -> m.PolicyDecisionOut:
    decision = await acting_client(request, who).policy_decide(body.workflow_id, body.step_id, body.input,
                                                               version=body.version, explain=explain)
    return m.PolicyDecisionOut(**dataclasses.asdict(decision))


@route("POST", "/policy/eval", Action.READ, response_model=m.PolicyDecisionOut,
       summary="What the active policy decides for one job")
async def policy_eval(request: Request, body: m.PolicyEval, who: Principal = Caller(Action.READ)
                      ) -> m.PolicyDecisionOut:
    return await _eval(request, who, body, False)


@route("POST", "/policy/explain", Action.READ, response_model=m.PolicyDecisionOut,
       summary="The decision and which rules matched")
async def policy_explain(request: Request, body: m.PolicyEval, who: Principal = Caller(Action.READ)
                         ) -> m.PolicyDecisionOut:
    return await _eval(request, who, body, True)


@route("POST", "/policy/simulate", Action.POLICY, response_model=m.PolicySimulationOut,
       summary="Re-decide recent jobs with a draft bundle")
async def policy_simulate(request: Request, body: m.PolicySimulate, who: Principal = Caller(Action.POLICY)
                          ) -> m.PolicySimulationOut:
    sim = await acting_client(request, who).policy_simulate(body.source, limit=body.limit)
    return m.PolicySimulationOut(**dataclasses.asdict(sim))


@route("POST", "/policy/publish", Action.POLICY, response_model=m.PolicyRevisionOut,
       summary="Make a bundle the active policy")
async def policy_publish(request: Request, body: m.PolicySource, who: Principal = Caller(Action.POLICY)
                         ) -> m.PolicyRevisionOut:
    return _revision(await acting_client(request, who).policy_publish(body.source, version=body.version,
                                                                      by=who.principal))


@route("POST", "/policy/rollback", Action.POLICY, response_model=m.PolicyRevisionOut,
       summary="Make the previous bundle (or a version) active again")
async def policy_rollback(request: Request, body: m.PolicyRollback, who: Principal = Caller(Action.POLICY)
                          ) -> m.PolicyRevisionOut:
    return _revision(await acting_client(request, who).policy_rollback(to=body.to, by=who.principal))


# -- operations ---------------------------------------------------------------------------------
@route("GET", "/agents", Action.READ, response_model=list[AgentRegistration], summary="Registered agent workers")
async def agents(request: Request, who: Principal = Caller(Action.READ)) -> list[AgentRegistration]:
    return await acting_client(request, who).agents()


@route("GET", "/schedules", Action.READ, response_model=list[ScheduleRow],
       summary="The tenant's workflow schedules, with their next tick and the run of the latest tick")
async def schedules(request: Request, who: Principal = Caller(Action.READ),
                    workflow: Annotated[str | None, Query(pattern=m.TOKEN, max_length=256)] = None
                    ) -> list[ScheduleRow]:
    return await acting_client(request, who).schedules(workflow_id=workflow)


# -- workload control (issue 16) -----------------------------------------------------------------
@route("GET", "/breakers", Action.READ, response_model=list[BreakerState], summary="Circuit breakers of the topics")
async def breakers(request: Request, who: Principal = Caller(Action.READ),
                   topic: Annotated[str | None, Query(pattern=m.TOPIC, max_length=256)] = None) -> list[BreakerState]:
    return await acting_client(request, who).breakers(topic)


@route("GET", "/breakers/{topic}/log", Action.READ, response_model=list[BreakerChange],
       summary="One breaker's state changes, oldest first")
async def breaker_log(request: Request, topic: Topic, who: Principal = Caller(Action.READ)) -> list[BreakerChange]:
    return await acting_client(request, who).breaker_log(topic)


@route("GET", "/rollouts", Action.READ, response_model=list[Rollout], summary="Canary rollouts of agent versions")
async def rollouts(request: Request, who: Principal = Caller(Action.READ)) -> list[Rollout]:
    return await acting_client(request, who).rollouts()


@route("POST", "/rollouts", Action.OPERATE, response_model=Rollout, status_code=201,
       summary="Start a canary rollout of an agent version")
async def rollout_start(request: Request, body: m.RolloutStart, who: Principal = Caller(Action.OPERATE)) -> Rollout:
    return await acting_client(request, who).rollout_start(
        body.topic, body.to, body.share, stable=body.stable, window_s=body.window_s, min_jobs=body.min_jobs,
        max_failure_delta=body.max_failure_delta, max_latency_ratio=body.max_latency_ratio)


@route("POST", "/rollouts/{topic}/abort", Action.OPERATE, response_model=Rollout,
       summary="Stop an active rollout (every job to the stable version)")
async def rollout_abort(request: Request, topic: Topic, body: m.RolloutAbort,
                        who: Principal = Caller(Action.OPERATE)) -> Rollout:
    return await acting_client(request, who).rollout_abort(topic, reason=body.reason)


@route("DELETE", "/rollouts/{topic}", Action.OPERATE, response_model=Rollout,
       summary="Remove a finished rollout (the topic's jobs go to any worker again)")
async def rollout_clear(request: Request, topic: Topic, who: Principal = Caller(Action.OPERATE)) -> Rollout:
    return await acting_client(request, who).rollout_clear(topic)


@route("GET", "/queues", Action.READ, response_model=dict[str, int],
       summary="Jobs queued per topic (published, not yet finished by a worker)")
async def queues(request: Request, who: Principal = Caller(Action.READ)) -> dict[str, int]:
    return await acting_client(request, who).queue_depth()


@route("GET", "/dead-letters", Action.ADMIN, response_model=list[DeadLetter],
       summary="Messages a service could not process (every tenant's)")
async def dead_letters(request: Request, who: Principal = Caller(Action.ADMIN),
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[DeadLetter]:
    return await acting_client(request, who).dead_letters(limit=limit)


async def _verify(client: Client, run_id: str) -> m.VerifyOut:
    report = await client.verify(run_id)
    if report.events == 0:
        raise NotFound(f"run {run_id} not found")
    return m.VerifyOut(run_id=report.run_id, tenant=report.tenant or client.tenant, events=report.events,
                       ok=report.ok, head_hash=report.head_hash,
                       problems=[dataclasses.asdict(p) for p in report.problems])


@route("GET", "/workflow-runs/{run_id}/verify", Action.READ, response_model=m.VerifyOut,
       summary="Check the run's hash chain")
async def verify(request: Request, run_id: RunId, who: Principal = Caller(Action.READ)) -> m.VerifyOut:
    return await _verify(acting_client(request, who), run_id)


@route("GET", "/workflow-runs/{run_id}/export", Action.READ, response_model=m.AuditExport,
       summary="The run's whole event log, as stored, with the chain check")
async def export(request: Request, run_id: RunId, who: Principal = Caller(Action.READ)) -> m.AuditExport:
    client = acting_client(request, who)
    report = await _verify(client, run_id)
    return m.AuditExport(run_id=run_id, tenant=client.tenant, events=await client.events(run_id), verify=report)


# -- API keys -----------------------------------------------------------------------------------
def _key_out(record: ApiKeyRecord) -> m.ApiKeyOut:
    return m.ApiKeyOut(key_id=record.key_id, tenant=record.tenant, role=record.role, principal=record.principal,
                       created_at=record.created_at.isoformat(), created_by=record.created_by,
                       revoked_at=record.revoked_at.isoformat() if record.revoked_at else None,
                       revoked_by=record.revoked_by)


@route("GET", "/api-keys", Action.ADMIN, response_model=m.ApiKeysPage, summary="The tenant's API keys (no secrets)")
async def list_keys(request: Request, who: Principal = Caller(Action.ADMIN)) -> m.ApiKeysPage:
    return m.ApiKeysPage(items=[_key_out(r) for r in await acting_client(request, who).api_keys()])


@route("POST", "/api-keys", Action.ADMIN, status_code=201, response_model=m.ApiKeyCreated,
       summary="Create an API key in the caller's tenant (shown once)")
async def create_key(request: Request, body: m.CreateApiKey, who: Principal = Caller(Action.ADMIN)
                     ) -> m.ApiKeyCreated:
    record, key = await acting_client(request, who).create_api_key(body.role, principal=body.principal,
                                                                   by=who.principal)
    return m.ApiKeyCreated(key=key, record=_key_out(record))


@route("DELETE", "/api-keys/{key_id}", Action.ADMIN, response_model=m.ApiKeyOut, summary="Revoke an API key")
async def revoke_key(request: Request, key_id: Annotated[str, Path(pattern=r"^[0-9a-f]{12}$")],
                     who: Principal = Caller(Action.ADMIN)) -> m.ApiKeyOut:
    return _key_out(await acting_client(request, who).revoke_api_key(key_id, by=who.principal))
