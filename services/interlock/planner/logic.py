"""The planner's decisions, as a pure function of a run's state and its workflow.

:func:`plan` looks at the run and appends whatever follows from it: steps that became ready,
steps skipped by a condition, for_each items within ``max_parallel``, the next compensation, or
the run's end. It reads nothing but its arguments, so it can run again after a conflict or a
redelivery and decide the same thing (or that nothing is left to do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import JobError, PayloadRef
from interlock.core import usage
from interlock.core.codec import canonical_json, job_hash, sha256_hex
from interlock.core.run import Run, StepState
from interlock.core.steps import compensation_id, is_workflow_step, item_id, schema_error, template_context
from interlock.core.workflow import (
    OnError,
    Step,
    StepType,
    TemplateError,
    Workflow,
    evaluate_condition,
    evaluate_for_each,
    render_input,
)


@dataclass
class Spill:
    """Step inputs over ``inline_limit`` bytes go to the object store, the log keeps a reference.

    Planning stays pure: the reference (sha256 of the canonical JSON) is computed here and the
    bytes are collected in ``uploads``; the planner stores them before it appends the events.
    """

    inline_limit: int
    uploads: dict[str, bytes] = field(default_factory=dict)

    def __call__(self, value: Any) -> tuple[Any, PayloadRef | None]:
        data = canonical_json(value)
        if len(data) <= self.inline_limit:
            return value, None
        digest = sha256_hex(data)
        self.uploads[digest] = data
        return None, PayloadRef(object_store=s.PAYLOADS_OBJECT_STORE, key=digest, sha256=digest, size=len(data))


def _fail_now(run: Run, step_id: str, message: str, kind: str) -> None:
    run.fail_step(ev.StepFailed(step_id=step_id, attempt=0, final=True,
                                error=JobError(message=message, retryable=False, kind=kind)))


def _ready(run: Run, wf: Workflow, step_id: str, spec: Step, value: Any, *, parent: str | None = None,
           compensation_of: str | None = None, topic: str | None = None, spill: Spill | None = None) -> None:
    topic = topic if topic is not None else spec.topic
    inline, ref = spill(value) if spill is not None else (value, None)
    run.mark_step_ready(ev.StepReady(
        step_id=step_id, step_type="job" if compensation_of else spec.type.value, topic=topic,
        input=inline, input_ref=ref, parent_id=parent, compensation_of=compensation_of,
        job_hash=job_hash(workflow_id=wf.id, workflow_version=wf.version, step_id=step_id, topic=topic,
                          input=value),
    ))
    if step_id in run.reused_outputs:
        run.succeed_step(ev.StepSucceeded(step_id=step_id, attempt=0, output=run.reused_outputs[step_id],
                                          worker="reused"))
        return
    if spec.input_schema is not None and compensation_of is None:
        error = schema_error(value, spec.input_schema)
        if error:
            _fail_now(run, step_id, f"input does not match input_schema: {error}", "input_schema")


def _dependency_verdict(run: Run, wf: Workflow, spec: Step) -> str:
    """'wait', 'run', 'skip' (every dependency skipped) or 'blocked' (a dependency failed)."""
    if not spec.depends_on:
        return "run"
    states = []
    for dep in spec.depends_on:
        st = run.steps.get(dep)
        if st is None or not st.terminal:
            return "wait"
        if st.status in ("failed", "denied", "cancelled") and wf.steps[dep].on_error != OnError.CONTINUE:
            return "blocked"
        states.append(st.status)
    if all(status == "skipped" for status in states):
        return "skip"
    return "run"


def plan(run: Run, wf: Workflow, outputs: dict[str, Any], run_input: Any, now: datetime,
         spill: Spill | None = None, tenant_over: usage.Overrun | None = None) -> None:
    """Append what follows from the run's state. ``outputs`` holds resolved large outputs;
    ``spill`` (when given) moves large step inputs to the object store; ``tenant_over`` is the
    tenant's budget overrun in its window, if it has one (the run then ends)."""
    if run.terminal:
        return
    if run.status == "compensating":
        _plan_compensation(run, wf, outputs, spill)
        return
    if _over_budget(run, wf, tenant_over):
        return
    failed = _first_unhandled_failure(run, wf)
    if failed is not None:
        _handle_failure(run, wf, failed, outputs, spill)
        return
    context = template_context(run, outputs, run_input)
    for sid in wf.topological_order():
        _plan_step(run, wf, sid, wf.steps[sid], context, spill)
        state = run.steps.get(sid)
        if state is not None:
            # later steps of this same pass read what just happened here (a step skipped, a
            # reused output, a for_each parent whose last item finished)
            context["steps"][sid] = {"output": outputs.get(sid, state.output), "status": state.status}
    if run.status == "running" and _first_unhandled_failure(run, wf) is None:
        _maybe_finish(run, wf, outputs)


def _over_budget(run: Run, wf: Workflow, tenant_over: usage.Overrun | None) -> bool:
    """End the run when its model spend crossed the workflow's budget, or its tenant's spend the
    tenant's budget (nothing more is dispatched)."""
    if run.status != "running":
        return False
    over = None
    if wf.budget is not None:
        over = usage.overrun(usage.total(run.usage), usage.parse_limits(wf.budget.model_dump()))
    scope: Literal["run", "tenant"] = "run"
    if over is None and tenant_over is not None:
        over, scope = tenant_over, "tenant"
    if over is None:
        return False
    run.exceed_budget(ev.BudgetExceeded(scope=scope, limit=over.limit, allowed=over.allowed, spent=over.spent))
    run.fail(ev.RunFailed(reason=over.describe("the run" if scope == "run" else f"tenant {run.tenant!r}")))
    return True


def _plan_step(run: Run, wf: Workflow, sid: str, spec: Step, context: dict[str, Any], spill: Spill | None) -> None:
    state = run.steps.get(sid)
    if state is not None:
        if state.status == "expanded":
            _plan_items(run, wf, sid, spec, state, context, spill=spill)
        return
    verdict = _dependency_verdict(run, wf, spec)
    if verdict in ("wait", "blocked"):
        return
    if verdict == "skip":
        run.skip_step(ev.StepSkipped(step_id=sid, reason="every dependency was skipped"))
        return
    try:
        if spec.when is not None and not evaluate_condition(spec.when, context, location=f"steps.{sid}.when"):
            run.skip_step(ev.StepSkipped(step_id=sid, reason=f"condition is false: {spec.when}"))
            return
        if spec.for_each is not None:
            items = evaluate_for_each(spec.for_each, context, location=f"steps.{sid}.for_each")
            run.expand_step(ev.StepExpanded(step_id=sid, count=len(items)))
            _plan_items(run, wf, sid, spec, run.steps[sid], context, items, spill=spill)
            return
        value = _step_input(spec, context, sid)
    except TemplateError as e:
        run.mark_step_ready(ev.StepReady(step_id=sid, step_type=spec.type.value, topic=spec.topic,
                                         input=None, job_hash=""))
        _fail_now(run, sid, str(e), "template")
        return
    _ready(run, wf, sid, spec, value, spill=spill)


def _step_input(spec: Step, context: dict[str, Any], sid: str) -> Any:
    """The rendered ``input``; a job step that names none gets the run's input (not null)."""
    if spec.type is StepType.JOB and "input" not in spec.model_fields_set:
        return context["input"]
    return render_input(spec.input, context, location=f"steps.{sid}.input")


def _plan_items(run: Run, wf: Workflow, sid: str, spec: Step, parent: StepState, context: dict[str, Any],
                items: list[Any] | None = None, *, spill: Spill | None = None) -> None:
    count = parent.item_count or 0
    if items is None:
        try:
            items = evaluate_for_each(spec.for_each or "[]", context, location=f"steps.{sid}.for_each")
        except TemplateError as e:
            _fail_now(run, sid, str(e), "template")
            return
    children = [run.steps.get(item_id(sid, i)) for i in range(count)]
    if any(c is not None and c.status in ("failed", "denied", "cancelled") for c in children):
        failed = [item_id(sid, i) for i, c in enumerate(children) if c is not None and c.status == "failed"]
        if all(c is None or c.terminal for c in children):
            _fail_now(run, sid, f"{len(failed)} of {count} items failed: {', '.join(failed[:5])}", "for_each")
        return
    if all(c is not None and c.status == "succeeded" for c in children):
        run.succeed_step(ev.StepSucceeded(step_id=sid, attempt=0, output=[c.output for c in children if c]))
        return
    active = sum(1 for c in children if c is not None and not c.terminal)
    budget = (spec.max_parallel or count) - active
    for i, child in enumerate(children):
        if budget <= 0:
            break
        if child is not None:
            continue
        item_context = {**context, "item": items[i] if i < len(items) else None, "index": i}
        try:
            value = _step_input(spec, item_context, sid)
        except TemplateError as e:
            cid = item_id(sid, i)
            run.mark_step_ready(ev.StepReady(step_id=cid, topic=spec.topic, input=None, job_hash="", parent_id=sid))
            _fail_now(run, cid, str(e), "template")
            budget -= 1
            continue
        _ready(run, wf, item_id(sid, i), spec, value, parent=sid, spill=spill)
        budget -= 1


def _first_unhandled_failure(run: Run, wf: Workflow) -> str | None:
    for sid, st in run.steps.items():
        if st.status not in ("failed", "denied") or not is_workflow_step(sid):
            continue
        if wf.steps[sid].on_error != OnError.CONTINUE:
            return sid
    return None


def _handle_failure(run: Run, wf: Workflow, failed: str, outputs: dict[str, Any], spill: Spill | None) -> None:
    spec = wf.steps[failed]
    state = run.steps[failed]
    reason = state.error.message if state.error else f"step {failed} {state.status}"
    if spec.on_error == OnError.COMPENSATE:
        to_undo = _compensation_order(run, wf)
        if to_undo:
            run.start_compensation(ev.CompensationStarted(failed_step=failed, steps=to_undo))
            _plan_compensation(run, wf, outputs, spill)
            return
    run.fail(ev.RunFailed(reason=f"step {failed} failed: {reason}", step_id=failed))


def _compensation_order(run: Run, wf: Workflow) -> list[str]:
    """Succeeded steps with a compensation job, most recently finished first."""
    done = [(st.updated_at, sid) for sid, st in run.steps.items()
            if st.status == "succeeded" and sid in wf.steps and wf.steps[sid].compensate]
    return [sid for _, sid in sorted(done, key=lambda pair: (pair[0] is None, pair[0]), reverse=True)]


def _plan_compensation(run: Run, wf: Workflow, outputs: dict[str, Any], spill: Spill | None) -> None:
    comp = run.compensation
    assert comp is not None
    if not comp.finished:
        for sid in comp.steps:
            cid = compensation_id(sid)
            st = run.steps.get(cid)
            if st is None:
                spec = wf.steps[sid]
                original = run.steps[sid]
                _ready(run, wf, cid, spec, {"step": sid, "input": original.input,
                                            "output": outputs.get(sid, original.output)},
                       compensation_of=sid, topic=spec.compensate, spill=spill)
                return
            if not st.terminal:
                return
        failed = [sid for sid in comp.steps if run.steps[compensation_id(sid)].status != "succeeded"]
        run.finish_compensation(ev.CompensationFinished(ok=not failed, failed_steps=failed))
    failed_state = run.steps[comp.failed_step]
    reason = failed_state.error.message if failed_state.error else failed_state.status
    note = "compensated" if comp.ok else f"compensation failed for {', '.join(comp.failed_steps)}"
    run.fail(ev.RunFailed(reason=f"step {comp.failed_step} failed: {reason} ({note})",
                          step_id=comp.failed_step, compensated=comp.ok))


def _maybe_finish(run: Run, wf: Workflow, outputs: dict[str, Any]) -> None:
    if any(sid not in run.steps or not run.steps[sid].terminal for sid in wf.steps):
        return
    if any(not st.terminal for st in run.steps.values()):
        return
    sinks = [sid for sid in wf.steps if not any(sid in other.depends_on for other in wf.steps.values())]
    result = {sid: outputs.get(sid, run.steps[sid].output) for sid in sinks
              if run.steps[sid].status == "succeeded"}
    run.succeed(ev.RunSucceeded(output=result))

