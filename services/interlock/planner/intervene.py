"""A person's interventions in a run, and their feedback on step outputs (issue 17).

Commands ``il.cmd.{tenant}.{retry,skip,resume,pause,unpause,feedback}.{principal}`` (request-reply,
answered by any planner copy): the tenant and who acts are the subject's; the server lets only
an operator (or admin) credential send the interventions, and an operator, approver or admin
one feedback, each for its own tenant and under its own name. Every act is an event in the
run's log with ``by``, ``via`` and ``reason`` (see contracts/events.py for who consumes which).

The rules (what an act appends, or why it is refused) are the pure functions below, over the
Run and its Workflow; :class:`Interventions` does the I/O around them for the planner.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from faststream.nats import NatsBroker

from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import (
    CommandReply,
    FeedbackRequest,
    Message,
    PayloadRef,
    RetryStepRequest,
    RunControlRequest,
    SkipStepRequest,
)
from interlock.core.codec import canonical_json, job_hash, sha256_hex
from interlock.core.eventstore import RunNotFound
from interlock.core.run import IllegalTransition, Run, StepState
from interlock.core.sealed import SealedError
from interlock.core.steps import base_step_id, is_workflow_step, schema_error
from interlock.core.workflow import OnError, Workflow
from interlock.runtime.datakeys import DataKeyError
from interlock.runtime.registry import WorkflowNotFound
from interlock.runtime.service import body_disagrees

if TYPE_CHECKING:
    from interlock.planner.service import PlannerService


class Refusal(Exception):
    """Why a person's act is refused (the command's error)."""


# -- rules -----------------------------------------------------------------------------------
def output_hash(state: StepState) -> str:
    """The hash an output is known by: sha256 of its canonical JSON (a large output's reference
    already carries it)."""
    if state.output_ref is not None:
        return state.output_ref.sha256
    return sha256_hex(canonical_json(state.output))


def failed_steps(run: Run, wf: Workflow) -> list[str]:
    """The steps whose failure ended the run, as they would be retried: a failed for_each step
    through its failed items. Raises :class:`Refusal` for a failure no retry can undo."""
    targets: list[str] = []
    for sid, state in run.steps.items():
        if state.status != "failed" or not is_workflow_step(sid) or sid not in wf.steps:
            continue
        if wf.steps[sid].on_error == OnError.CONTINUE:
            continue  # it did not stop the run
        if state.item_count is not None:
            items = [cid for cid, c in run.steps.items() if c.parent_id == sid and c.status == "failed"]
            if not items:
                raise Refusal(f"step {sid!r} failed before its items ran ({_error(state)}): rerun the run instead")
            targets.extend(items)
        else:
            targets.append(sid)
    return targets


def _error(state: StepState) -> str:
    return state.error.message if state.error else state.status


def _act(by: str, request: RetryStepRequest | SkipStepRequest | RunControlRequest) -> dict[str, str]:
    reason = request.reason.strip()
    if not reason:
        raise Refusal("a reason is required")
    return {"by": by, "via": request.via, "reason": reason}


def _retry_one(run: Run, step_id: str, who: dict[str, str], *, patched: bool = False, value: Any = None,
               ref: PayloadRef | None = None, new_hash: str | None = None) -> None:
    state = run.steps[step_id]
    run.retry_step(ev.StepRetryRequested(
        step_id=step_id, attempt=state.attempt, patched=patched, input=value if patched and ref is None else None,
        input_ref=ref if patched else None, job_hash=new_hash or state.job_hash,
        previous_job_hash=state.job_hash, **who))


def _blocking_others(run: Run, wf: Workflow, step_id: str) -> None:
    """A failed run is reopened for one step only when that step alone ended it."""
    if run.status != "failed":
        return
    targets = failed_steps(run, wf)
    others = [t for t in targets if t != step_id]
    if step_id in targets and not others:
        return
    if step_id not in targets:
        raise Refusal(f"step {step_id!r} did not fail the run (failed: {', '.join(targets) or 'none'})")
    raise Refusal(f"the run also failed at {', '.join(others)}: resume the run (`interlock run resume`) to "
                  "retry every failed step, or skip the others first")


def retry(run: Run, wf: Workflow, by: str, request: RetryStepRequest, value: Any = None,
          ref: PayloadRef | None = None) -> None:
    """Retry ``request.step_id`` now; ``value``/``ref``: the patched input as it is stored
    (sealed, maybe offloaded). A patched input gets its own job hash, so policy (and any
    approval) decides for it, not for the input it replaces."""
    who = _act(by, request)
    step_id = request.step_id
    state = _known_step(run, wf, step_id)
    new_hash = None
    if request.patched:
        if state.step_type != "job":
            raise Refusal(f"step {step_id!r} is a {state.step_type} step: only a job's input can be patched")
        spec = wf.steps[base_step_id(step_id)]
        if spec.input_schema is not None:
            problem = schema_error(value, spec.input_schema)
            if problem:
                raise Refusal(f"the new input of step {step_id!r} does not match its input_schema: {problem}")
        new_hash = job_hash(workflow_id=wf.id, workflow_version=wf.version, step_id=step_id, topic=state.topic,
                            input=value)
    _blocking_others(run, wf, step_id)
    if run.status == "failed":
        run.resume(ev.RunResumed(steps=[step_id], **who))
    _retry_one(run, step_id, who, patched=request.patched, value=value, ref=ref, new_hash=new_hash)


def _known_step(run: Run, wf: Workflow, step_id: str) -> StepState:
    state = run.steps.get(step_id)
    if state is None:
        known = base_step_id(step_id) in wf.steps
        raise Refusal(f"step {step_id!r} of run {run.run_id} " + ("has not run yet" if known else
                      f"is not a step of workflow {wf.id} (steps: {', '.join(wf.steps)})"))
    return state


def resume(run: Run, wf: Workflow, by: str, request: RunControlRequest) -> list[str]:
    """Resume a failed run: every step whose failure ended it is retried (same run id)."""
    who = _act(by, request)
    if run.status != "failed":
        raise Refusal(f"run {run.run_id} is {run.status}; only a failed run can be resumed")
    steps = failed_steps(run, wf)
    if not steps:
        raise Refusal(f"run {run.run_id} has no failed step to go on from ({run.reason or 'no reason recorded'}): "
                      "rerun it instead")
    run.resume(ev.RunResumed(steps=steps, **who))  # the same commit retries each
    for step_id in steps:
        _retry_one(run, step_id, who)
    return steps


def skip(run: Run, wf: Workflow, by: str, request: SkipStepRequest, output: Any, ref: PayloadRef | None) -> None:
    """Complete ``request.step_id`` with a supplied output, so its dependants proceed."""
    who = _act(by, request)
    step_id = request.step_id
    if base_step_id(step_id) not in wf.steps:
        raise Refusal(f"step {step_id!r} is not a step of workflow {wf.id} (steps: {', '.join(wf.steps)})")
    spec = wf.steps[base_step_id(step_id)]
    if is_workflow_step(step_id) and spec.for_each is not None:
        raise Refusal(f"step {step_id!r} is a for_each step: skip its items ({step_id}[0], …)")
    state = run.steps.get(step_id)
    if state is not None and state.status == "denied":
        raise Refusal(f"step {step_id!r} was denied by policy: an output cannot be supplied in its place")
    if spec.output_schema is not None:
        problem = schema_error(output, spec.output_schema)
        if problem:
            raise Refusal(f"the supplied output of step {step_id!r} does not match its output_schema: {problem}")
    if run.status == "failed":
        _blocking_others(run, wf, step_id)
        run.resume(ev.RunResumed(steps=[step_id], **who))
    digest = ref.sha256 if ref is not None else sha256_hex(canonical_json(output))
    run.supply_output(ev.StepOutputSupplied(step_id=step_id, output=None if ref else output, output_ref=ref,
                                            output_hash=digest, previous_status=state.status if state else "",
                                            **who))


def pause(run: Run, by: str, request: RunControlRequest) -> None:
    run.pause(ev.RunPaused(**_act(by, request)))


def unpause(run: Run, by: str, request: RunControlRequest) -> None:
    run.unpause(ev.RunUnpaused(**_act(by, request)))


def feedback(run: Run, by: str, request: FeedbackRequest) -> ev.FeedbackGiven:
    """A person's rating or correction of a step's output, bound to the output's hash."""
    if request.score is None and not request.has_correction and not request.note.strip():
        raise Refusal("feedback needs a score, a correction or a note")
    if request.score is not None and not math.isfinite(request.score):
        raise Refusal(f"score: {request.score} is not a finite number")
    state = run.steps.get(request.step_id)
    if state is None:
        raise Refusal(f"step {request.step_id!r} of run {run.run_id} has no output (it has not run)")
    if state.status != "succeeded":
        raise Refusal(f"step {request.step_id!r} of run {run.run_id} is {state.status}: it has no output to rate")
    digest = output_hash(state)
    if request.output_hash and request.output_hash != digest:
        raise Refusal(f"the output of step {request.step_id!r} is {digest}, not {request.output_hash}: "
                      "it changed since you looked")
    data = ev.FeedbackGiven(step_id=request.step_id, by=by, via=request.via, output_hash=digest,
                            attempt=state.attempt, score=request.score,
                            correction=request.correction if request.has_correction else None,
                            note=request.note.strip())
    run.give_feedback(data)
    return data


# -- the planner's handlers --------------------------------------------------------------------
R = TypeVar("R", bound=Message)


class Interventions:
    """Answers the intervention and feedback commands for the planner (its store, registry,
    payloads and sealer)."""

    def __init__(self, planner: PlannerService) -> None:
        self.planner = planner

    def register(self, broker: NatsBroker) -> None:
        def refuse(why: str) -> CommandReply:
            return CommandReply(ok=False, error=why)

        p = self.planner
        p.answer(broker, s.commands("retry"), RetryStepRequest, self._guard(self.on_retry), refuse, keep_invalid=True)
        p.answer(broker, s.commands("skip"), SkipStepRequest, self._guard(self.on_skip), refuse, keep_invalid=True)
        for name, act in (("resume", self.on_resume), ("pause", self.on_pause), ("unpause", self.on_unpause)):
            p.answer(broker, s.commands(name), RunControlRequest, self._guard(act), refuse, keep_invalid=True)
        p.answer(broker, s.commands("feedback"), FeedbackRequest, self._guard(self.on_feedback), refuse,
                 keep_invalid=True)

    def _guard(self, act: Callable[[str, str, R], Awaitable[CommandReply]]
               ) -> Callable[[str, R], Awaitable[CommandReply]]:
        """The act as the subject's principal in the subject's tenant; a refusal is the reply."""
        async def handle(subject: str, request: R) -> CommandReply:
            tenant, _, principal = s.parse_command(subject)
            refusal = body_disagrees("tenant", getattr(request, "tenant", None), tenant, subject)
            if refusal is not None:
                return CommandReply(ok=False, error=refusal)
            try:
                return await act(tenant, principal, request)
            except (Refusal, IllegalTransition, RunNotFound, WorkflowNotFound) as e:
                return CommandReply(ok=False, error=str(e))
        return handle

    async def _update(self, tenant: str, run_id: str, decide: Callable[[Run, Workflow], None]) -> Run:
        async def apply(run: Run) -> None:
            workflow = await self.planner.registry.get(run.workflow_id, run.workflow_version)
            decide(run, workflow)

        handle, _ = await self.planner.store.update(tenant, run_id, apply, fresh=True)
        return handle.run

    def _seal(self, tenant: str, run_id: str, value: Any, root: str, paths: tuple[str, ...] | frozenset[str] = ()
              ) -> Any:
        """A value a person typed, with its sensitive parts sealed before it reaches the log."""
        try:
            return self.planner.sealer.seal_tree(tenant, run_id, value, root, paths)
        except (DataKeyError, SealedError) as e:
            raise Refusal(f"cannot seal the sensitive values of the {root}: {e}") from e

    async def on_retry(self, tenant: str, by: str, request: RetryStepRequest) -> CommandReply:
        value, ref = None, None
        if request.patched:
            value = self._seal(tenant, request.run_id, request.input, "input")
            _, ref = await self.planner.payloads.offload(value)
        run = await self._update(tenant, request.run_id, lambda run, wf: retry(run, wf, by, request, value, ref))
        state = run.steps[request.step_id]
        return CommandReply(ok=True, detail={"run_id": request.run_id, "step_id": request.step_id,
                                             "status": state.status, "job_hash": state.job_hash,
                                             "patched": request.patched})

    async def on_skip(self, tenant: str, by: str, request: SkipStepRequest) -> CommandReply:
        handle = await self.planner.store.load(tenant, request.run_id, fresh=True)
        wf = await self.planner.registry.get(handle.run.workflow_id, handle.run.workflow_version)
        workflow_paths = wf.sensitive_output_paths(base_step_id(request.step_id))
        output = self._seal(tenant, request.run_id, request.output, "output", workflow_paths)
        _, ref = await self.planner.payloads.offload(output)
        await self._update(tenant, request.run_id, lambda run, wf: skip(run, wf, by, request, output, ref))
        await self.planner.advance(tenant, request.run_id)  # its dependants are ready now
        return CommandReply(ok=True, detail={"run_id": request.run_id, "step_id": request.step_id,
                                             "status": "succeeded"})

    async def on_resume(self, tenant: str, by: str, request: RunControlRequest) -> CommandReply:
        steps: list[str] = []

        def decide(run: Run, wf: Workflow) -> None:
            steps[:] = resume(run, wf, by, request)

        await self._update(tenant, request.run_id, decide)
        return CommandReply(ok=True, detail={"run_id": request.run_id, "status": "running", "steps": steps})

    async def on_pause(self, tenant: str, by: str, request: RunControlRequest) -> CommandReply:
        await self._update(tenant, request.run_id, lambda run, wf: pause(run, by, request))
        return CommandReply(ok=True, detail={"run_id": request.run_id, "paused": True})

    async def on_unpause(self, tenant: str, by: str, request: RunControlRequest) -> CommandReply:
        await self._update(tenant, request.run_id, lambda run, wf: unpause(run, by, request))
        return CommandReply(ok=True, detail={"run_id": request.run_id, "paused": False})

    async def on_feedback(self, tenant: str, by: str, request: FeedbackRequest) -> CommandReply:
        given: list[ev.FeedbackGiven] = []

        def decide(run: Run, wf: Workflow) -> None:
            given[:] = [feedback(run, by, request)]

        await self._update(tenant, request.run_id, decide)
        return CommandReply(ok=True, detail={"run_id": request.run_id, "step_id": request.step_id,
                                             "output_hash": given[0].output_hash})
