"""Guard checks (#17) in the dispatcher: a job's output before its success, and the value a
``type: guardrail`` step checks once it is released.

The checks are :mod:`interlock.core.guard` (pure). The service runs them before a rule (it may
have to resolve or offload payloads) and hands the rule a :class:`Guarded`; :func:`record`
appends one ``GuardChecked`` per check and then what the verdicts ask for:

- no violation, or ``on_violation: redact``: the step succeeds with the (redacted) value;
- ``fail``: the attempt fails, not retryable (:func:`record` returns the error);
- ``approve``: the value is held for a person (secret and personal data redacted in it); the
  approval service asks for an approval (it consumes GuardChecked events with ``held``), and
  once granted :func:`release_held` succeeds the step with the held value.

Findings carry kinds and locations only, so no secret reaches the log through a verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from interlock.contracts import events as ev
from interlock.contracts.messages import JobError, LlmCall, PayloadRef
from interlock.core.guard import Outcome, summary
from interlock.core.run import Run, StepState

GUARD_WORKER = "guard"  # the worker name on outcomes the guard decides (no worker ran)


@dataclass(frozen=True)
class Guarded:
    """A value checked by a guard: the verdicts, and the value to record if the step goes on
    (inline, or the payload reference the service offloaded it to)."""

    outcome: Outcome
    approvers: str
    output: Any = None
    output_ref: PayloadRef | None = None


def record(run: Run, state: StepState, guarded: Guarded, *, attempt: int, worker: str = "",
           calls: Sequence[LlmCall] = ()) -> JobError | None:
    """Append the verdicts and act on them; returns the error to fail the attempt with (``fail``),
    else None (the step succeeded, or its value waits for approval)."""
    outcome = guarded.outcome
    # passes first: the last event is a violation, and a held output goes with it (the step then
    # waits for a person, and takes no more verdicts)
    verdicts = sorted(outcome.verdicts, key=lambda v: v.violation)
    for i, verdict in enumerate(verdicts):
        held = outcome.action == "approve" and i == len(verdicts) - 1
        run.check_guard(ev.GuardChecked(
            step_id=state.step_id, attempt=attempt, check=verdict.check,
            verdict="violation" if verdict.violation else "pass", findings=verdict.findings,
            action=outcome.action if verdict.violation else "none", held=held,
            held_output=guarded.output if held else None, held_output_ref=guarded.output_ref if held else None,
            approver_role=guarded.approvers if held else None, usage=list(calls) if held else []))
    if outcome.action == "fail":
        return JobError(message=f"guard: {summary(verdicts)}", retryable=False, kind="guard")
    if outcome.action in ("none", "redact"):
        run.succeed_step(ev.StepSucceeded(step_id=state.step_id, attempt=attempt, output=guarded.output,
                                          output_ref=guarded.output_ref, worker=worker or GUARD_WORKER,
                                          usage=list(calls)))
    return None


def check_guardrail(run: Run, state: StepState, guarded: Guarded) -> None:
    """A released guardrail step: its checks decide at once (a failure is final)."""
    error = record(run, state, guarded, attempt=0)
    if error is not None:
        run.fail_step(ev.StepFailed(step_id=state.step_id, attempt=0, error=error, final=True,
                                    worker=GUARD_WORKER))


def release_held(run: Run, state: StepState) -> None:
    """An output a guard held was approved (the step is released again): it succeeds with it."""
    run.succeed_step(ev.StepSucceeded(step_id=state.step_id, attempt=state.attempt, output=state.output,
                                      output_ref=state.output_ref, worker=GUARD_WORKER))


def guardrails_due(run: Run) -> list[StepState]:
    """Released guardrail steps whose checks have not run (the service resolves their values)."""
    if run.terminal:
        return []
    return [s for s in run.steps.values()
            if s.status == "released" and s.step_type == "guardrail" and s.guard_hold is None]
