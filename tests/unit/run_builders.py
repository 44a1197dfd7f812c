"""Runs and workflows for the pure-rule tests: built with the aggregate and the planner, no I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

from interlock.contracts import events as ev
from interlock.core.run import Run
from interlock.core.workflow import Workflow, parse_workflow
from interlock.planner.logic import plan

TENANT = "t-rules"


def workflow(timeout_ms: int | None = None, **steps: dict[str, Any]) -> Workflow:
    """A workflow ``wf`` version 1 with the given steps (``a={"topic": "t.a"}``)."""
    data: dict[str, Any] = {"id": "wf", "version": 1, "steps": steps}
    if timeout_ms is not None:
        data["timeout_ms"] = timeout_ms
    return parse_workflow(data)


def start(wf: Workflow, run_input: Any = None, **started: Any) -> Run:
    """A new run of ``wf`` (nothing planned yet)."""
    return Run.start(uuid.uuid4(), ev.RunStarted(
        workflow_id=wf.id, workflow_version=wf.version, definition_hash=wf.content_hash, input=run_input,
        idempotency_key=uuid.uuid4().hex, tenant=TENANT, **started))


def advance(run: Run, wf: Workflow, outputs: dict[str, Any] | None = None, now: datetime | None = None) -> Run:
    """Let the planner append whatever follows from the run's state, pass after pass until a
    pass appends nothing (the service plans again after each commit of its own)."""
    while True:
        version = run.version
        plan(run, wf, outputs or {}, run.input, now or datetime.now(UTC))
        if run.version == version:
            return run


def started_run(wf: Workflow, run_input: Any = None) -> Run:
    """A run whose first steps the planner made ready."""
    return advance(start(wf, run_input), wf)


def decide(run: Run, step_id: str, decision: ev.Decision = "allow", **fields: Any) -> None:
    """Record a policy decision for a ready step (snapshot ``snap-1``)."""
    state = run.steps[step_id]
    step_type: Any = state.step_type
    run.decide_policy(ev.PolicyDecided(step_id=step_id, decision=decision, step_type=step_type,
                                       snapshot_id=fields.pop("snapshot_id", "snap-1"), rule_ids=["r1"],
                                       job_hash=state.job_hash, **fields))


def succeed(run: Run, step_id: str, output: Any = None) -> None:
    """The current attempt of ``step_id`` succeeds (attempt 0 for steps that run no job)."""
    run.succeed_step(ev.StepSucceeded(step_id=step_id, attempt=run.steps[step_id].attempt, output=output))


def appended(run: Run) -> list[ev.EventData]:
    """The event data the run appended since the last call (and forgets them)."""
    return [cast(Any, e).data for e in run.collect_events()]


def types(run: Run) -> list[str]:
    """The event types the run appended since the last call (and forgets them)."""
    return [type(data).type_name for data in appended(run)]
