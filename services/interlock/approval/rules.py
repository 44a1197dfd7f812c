"""The approval service's decisions, as pure functions of a run, its workflow, the time and input.

Each rule calls commands on the :class:`Run` and returns what the service must do once the
events are durable (timers to schedule). The clock and the policy snapshot in force are inputs.
An approval is bound to the job hash and policy snapshot it was asked for: a decision for
another hash is refused by the aggregate, one given after the policy changed sends the job back
to policy, and a timer for a request that was since replaced does nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from interlock.contracts import events as ev
from interlock.contracts import routing
from interlock.contracts.messages import ApprovalDecision, JobError, TimerFired
from interlock.core.run import ApprovalState, Run, StepState
from interlock.core.steps import base_step_id, template_context
from interlock.core.workflow import TemplateError, Workflow, render_text

needs_a_person = routing.needs_a_person
"""Only decisions that wait for a person concern this service: it never loads other runs (its
consumer gets only the commits routed to it, and this picks the events among them)."""


def request_approvals(run: Run, workflow: Workflow, now: datetime) -> list[TimerFired]:
    """Ask for a person wherever policy (or an approval step) holds a job and no request is
    pending; returns the expiry and escalation timers of the new requests."""
    timers: list[TimerFired] = []
    if run.terminal:
        return timers
    for state in list(run.steps.values()):
        if state.status != "awaiting_approval" or state.decision is None:
            continue
        if state.approval is not None and state.approval.status == "requested":
            continue
        spec = workflow.steps[base_step_id(state.step_id)]
        decision = state.decision
        expires_ms = decision.approval_expires_ms or spec.expires_ms
        expires_at = now + timedelta(milliseconds=expires_ms) if expires_ms else None
        escalate_at = (now + timedelta(milliseconds=decision.escalate_after_ms)
                       if decision.escalate_after_ms and decision.escalate_to_role else None)
        held = state.guard_hold is not None  # guard (#17): a held output, not the job, is to approve
        run.request_approval(ev.ApprovalRequested(
            step_id=state.step_id, job_hash=state.job_hash, snapshot_id=decision.snapshot_id,
            approver_role=state.guard_hold or decision.approver_role or spec.approvers,
            prompt=(f"release the output of {state.step_id}, held by its guard (see its GuardChecked findings)"
                    if held else prompt(run, spec.prompt, state.step_id)), expires_at=expires_at,
            escalate_at=escalate_at, escalate_to_role=decision.escalate_to_role if escalate_at else None,
        ))
        # the run's version names the request: a timer left from an earlier one is told apart
        for kind, due in (("approval_expiry", expires_at), ("approval_escalation", escalate_at)):
            if due is not None:
                timers.append(TimerFired(kind=kind, run_id=run.run_id, tenant=run.tenant, step_id=state.step_id,
                                         attempt=run.version, due_at=due))
    return timers


def prompt(run: Run, template: str | None, step_id: str) -> str:
    """The text the approver sees; a template that does not render is shown as written."""
    if not template:
        return f"approve {step_id} of {run.workflow_id}"
    try:
        return render_text(template, template_context(run, {}, run.input), location=f"steps.{step_id}.prompt")
    except TemplateError as e:
        return f"{template} (could not render: {e})"


def refusal(run: Run, decision: ApprovalDecision, principal: str, roles: set[str] | None, *,
            grant: bool) -> ev.ApprovalRefused | None:
    """Why ``principal`` (holding ``roles`` in the approver directory; None: nobody is registered,
    so the role the decision names is trusted) may not decide the pending request, as the event
    that records it; None if they may, or if no request is pending (the aggregate refuses that)."""
    state = run.steps.get(decision.step_id)
    request = state.approval if state is not None else None
    if request is None or request.status != "requested" or run.terminal:
        return None
    required = request.approver_role
    if roles is not None and required not in roles:
        held = f"holds {', '.join(sorted(roles))}" if roles else "is not a registered approver"
        reason = f"{principal!r} lacks role {required!r} ({held})"
    elif decision.role != required:
        reason = f"{principal!r} decided as role {decision.role!r}; the request needs role {required!r}"
    elif decision.job_hash != request.job_hash:
        reason = (f"the decision is for job hash {decision.job_hash[:12]}…, the request is for "
                  f"{request.job_hash[:12]}…")
    else:
        return None
    return ev.ApprovalRefused(step_id=decision.step_id, principal=principal, role=decision.role,
                              job_hash=decision.job_hash, reason=reason, required_role=required,
                              decision="approve" if grant else "reject")


SIGNATURE_SKEW = timedelta(minutes=10)  # a statement signed longer ago (or ahead) than this is refused


def statement_problem(run: Run, decision: ApprovalDecision, principal: str, tenant: str, *, grant: bool,
                      now: datetime) -> str | None:
    """Why the signed statement does not say what the decision says (run, step, job hash,
    snapshot, role, decision, principal, tenant), or is stale; None if it does. The signature
    itself is the keyring's to check."""
    if decision.signed is None:
        return "the decision is not signed (sign it with your own key: the CLI and the client do)"
    statement = decision.signed.statement
    state = run.steps.get(decision.step_id)
    request = state.approval if state is not None else None
    expected = {"tenant": tenant, "run_id": decision.run_id, "step_id": decision.step_id,
                "job_hash": decision.job_hash, "role": decision.role, "principal": principal,
                "decision": "approve" if grant else "reject", "reason": decision.reason}
    if request is not None:
        expected["snapshot_id"] = request.snapshot_id
    wrong = [f"{name} {getattr(statement, name)!r} (expected {value!r})" for name, value in expected.items()
             if getattr(statement, name) != value]
    if wrong:
        return f"the signed statement says {', '.join(wrong)}"
    try:
        at = datetime.fromisoformat(statement.at)
    except ValueError:
        return f"the signed statement's time {statement.at!r} is not RFC 3339"
    if at.tzinfo is None or abs(now - at) > SIGNATURE_SKEW:
        return f"the signed statement is from {statement.at}, not within {SIGNATURE_SKEW} of now"
    return None


def signature_refusal(run: Run, decision: ApprovalDecision, principal: str, reason: str, *,
                      grant: bool) -> ev.ApprovalRefused | None:
    """The event recording a decision refused for its signature, when a request is pending."""
    state = run.steps.get(decision.step_id)
    request = state.approval if state is not None else None
    if request is None or request.status != "requested" or run.terminal:
        return None
    return ev.ApprovalRefused(step_id=decision.step_id, principal=principal, role=decision.role,
                              job_hash=decision.job_hash, reason=reason, required_role=request.approver_role,
                              decision="approve" if grant else "reject")


def refusal_message(run_id: str, refused: ev.ApprovalRefused) -> str:
    """The reply to a refused decision: who, which step, what is missing."""
    return (f"{refused.principal!r} may not {refused.decision} step {refused.step_id!r} of run {run_id}: "
            f"{refused.reason}; the request stays pending (the refusal is recorded in the run's log)")


def apply_decision(run: Run, decision: ApprovalDecision, approver: str, *, grant: bool, snapshot_id: str,
                   now: datetime) -> str | None:
    """``approver``'s grant or rejection. Returns why the request was invalidated instead (the
    policy changed from the snapshot it was asked under to ``snapshot_id``, the one in force),
    else None. Raises :class:`~interlock.core.run.IllegalTransition` for a decision the request
    does not allow (another job hash, an expired request, the wrong role)."""
    state = run.steps.get(decision.step_id)
    request = state.approval if state is not None else None
    # a guard's hold (#17) is about an output already made, not a job to start: policy is not asked again
    if grant and request is not None and request.status == "requested" and state is not None \
            and state.guard_hold is None \
            and decision.job_hash == request.job_hash and request.snapshot_id != snapshot_id:
        # this approval was given for rules no longer in force, so the job goes back to policy
        # and is asked again if needed
        why = f"policy changed from {request.snapshot_id} to {snapshot_id} while the request waited"
        run.invalidate_approval(ev.ApprovalInvalidated(step_id=decision.step_id, job_hash=request.job_hash,
                                                       reason=why, snapshot_id=snapshot_id))
        return why
    if grant:
        run.grant_approval(ev.ApprovalGranted(
            step_id=decision.step_id, job_hash=decision.job_hash, approver=approver,
            role=decision.role, reason=decision.reason, signed=decision.signed, via=decision.via), now)
        if state is not None and state.step_type == "approval":
            run.succeed_step(ev.StepSucceeded(step_id=decision.step_id, attempt=0, worker=approver,
                                              output={"approved_by": approver, "reason": decision.reason}))
        return None
    run.reject_approval(ev.ApprovalRejected(
        step_id=decision.step_id, job_hash=decision.job_hash, approver=approver,
        role=decision.role, reason=decision.reason, signed=decision.signed, via=decision.via))
    run.fail_step(ev.StepFailed(step_id=decision.step_id, attempt=0, final=True, worker=approver,
                                error=JobError(message=f"rejected by {approver}: "
                                               f"{decision.reason or 'no reason given'}",
                                               retryable=False, kind="approval_rejected")))
    return None


def _pending(run: Run, timer: TimerFired) -> tuple[StepState, ApprovalState] | None:
    """The step and its request that a timer may act on: still requested, run still going."""
    state = run.steps.get(timer.step_id or "")
    approval = state.approval if state else None
    if state is None or approval is None or approval.status != "requested" or run.terminal:
        return None
    return state, approval


def escalate(run: Run, timer: TimerFired) -> None:
    """An escalation timer: hand the request to the escalation role, unless it was replaced by a
    newer request or already escalated."""
    pending = _pending(run, timer)
    if pending is None:
        return
    state, approval = pending
    if approval.escalate_at is None or approval.escalate_at > timer.due_at:
        return  # a newer request (the policy changed) replaced the one this timer was for
    to_role = state.decision.escalate_to_role if state.decision else None
    if not to_role or approval.approver_role == to_role:
        return  # already escalated, or nothing to escalate to
    run.escalate_approval(ev.ApprovalEscalated(step_id=state.step_id, job_hash=approval.job_hash,
                                               from_role=approval.approver_role, to_role=to_role))


def expire(run: Run, timer: TimerFired, now: datetime) -> None:
    """An expiry timer: the request expires and its step fails, unless a newer request (one
    that expires later) replaced it."""
    pending = _pending(run, timer)
    if pending is None:
        return
    state, approval = pending
    if approval.expires_at is None or approval.expires_at > now:
        return  # a newer request replaced the one this timer was for
    run.expire_approval(ev.ApprovalExpired(step_id=state.step_id, job_hash=approval.job_hash))
    run.fail_step(ev.StepFailed(step_id=state.step_id, attempt=0, final=True, error=JobError(
        message="approval request expired", retryable=False, kind="approval_expired")))
