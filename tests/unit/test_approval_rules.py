"""The approval rules without NATS: requests, grant, reject, invalidation, expiry and escalation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from interlock.approval import rules
from interlock.contracts import events as ev
from interlock.contracts.messages import ApprovalDecision, TimerFired
from interlock.core.run import IllegalTransition, Run
from interlock.core.workflow import Workflow
from tests.unit.run_builders import appended, decide, started_run, types, workflow

GATED = {"topic": "t.deploy", "input": {"env": "{{ input.env }}"}, "require_approval": True}
APPROVAL = {"type": "approval", "approvers": "sre", "prompt": "deploy to {{ input.env }}?"}


def held(wf: Workflow, run_input: Any = None, step_id: str = "a", **decision: Any) -> Run:
    """A run whose step waits for a person (policy said require_approval, or it is an approval step)."""
    run = started_run(wf, run_input)
    if run.steps[step_id].step_type == "approval":
        decide(run, step_id, "allow", **decision)
    else:  # policy names the role that may approve a gated job
        decide(run, step_id, "require_approval", **{"approver_role": "sre", **decision})
    run.collect_events()
    assert run.steps[step_id].status == "awaiting_approval"
    return run


def requested(wf: Workflow, now: datetime, run_input: Any = None, **decision: Any) -> tuple[Run, list[TimerFired]]:
    run = held(wf, run_input, **decision)
    timers = rules.request_approvals(run, wf, now)
    run.collect_events()
    return run, timers


def verdict(run: Run, role: str = "sre", job_hash: str | None = None, step_id: str = "a") -> ApprovalDecision:
    return ApprovalDecision(run_id=run.run_id, step_id=step_id, job_hash=job_hash or run.steps[step_id].job_hash,
                            role=role, reason="looks fine")


def fired(run: Run, kind: Any, due_at: datetime) -> TimerFired:
    return TimerFired(kind=kind, run_id=run.run_id, tenant=run.tenant, step_id="a", attempt=run.version,
                      due_at=due_at)


def now() -> datetime:
    return datetime.now(UTC)


def test_only_decisions_waiting_for_a_person_concern_the_service() -> None:
    decided = ev.PolicyDecided.type_name
    assert rules.needs_a_person({"type": decided, "data": {"decision": "require_approval", "step_type": "job"}})
    assert rules.needs_a_person({"type": decided, "data": {"decision": "allow", "step_type": "approval"}})
    assert rules.needs_a_person({"type": decided, "data": {"decision": "allow"}})  # recorded before step_type
    assert not rules.needs_a_person({"type": decided, "data": {"decision": "allow", "step_type": "job"}})
    assert not rules.needs_a_person({"type": ev.StepReady.type_name, "data": {}})


def test_request_with_expiry_and_escalation() -> None:
    wf = workflow(a=GATED)
    t0 = now()
    run = held(wf, {"env": "prod"}, approver_role="lead", approval_expires_ms=60_000, escalate_after_ms=10_000,
               escalate_to_role="director")
    timers = rules.request_approvals(run, wf, t0)
    assert types(run) == [ev.ApprovalRequested.type_name]
    approval = run.steps["a"].approval
    assert approval is not None
    assert (approval.status, approval.approver_role, approval.snapshot_id) == ("requested", "lead", "snap-1")
    assert approval.expires_at == t0 + timedelta(minutes=1)
    assert approval.escalate_at == t0 + timedelta(seconds=10)
    assert approval.job_hash == run.steps["a"].job_hash
    assert timers == [fired(run, "approval_expiry", t0 + timedelta(minutes=1)),
                      fired(run, "approval_escalation", t0 + timedelta(seconds=10))]
    # asked once: a redelivery of the same commit requests nothing more
    assert rules.request_approvals(run, wf, now()) == [] and types(run) == []


def test_request_falls_back_to_the_step_and_renders_its_prompt() -> None:
    wf = workflow(a={**APPROVAL, "expires_ms": 5000})
    t0 = now()
    run = held(wf, {"env": "dev"}, escalate_after_ms=1000)  # no role to escalate to: no escalation
    [expiry] = rules.request_approvals(run, wf, t0)
    assert expiry == fired(run, "approval_expiry", t0 + timedelta(seconds=5))
    approval = run.steps["a"].approval
    assert approval is not None and approval.approver_role == "sre" and approval.escalate_at is None
    [event] = appended(run)
    assert isinstance(event, ev.ApprovalRequested) and event.prompt == "deploy to dev?"


def test_prompts_default_and_survive_a_bad_template() -> None:
    wf = workflow(a={"topic": "t.a"})
    run = started_run(wf)
    assert rules.prompt(run, None, "a") == "approve a of wf"
    broken = rules.prompt(run, "see {{ steps.nope.output.x", "a")
    assert broken.startswith("see {{ steps.nope.output.x (could not render:")


def test_no_request_without_expiry_schedules_no_timer_and_none_for_an_ended_run() -> None:
    wf = workflow(a={"type": "approval", "approvers": "lead"})
    run = held(wf)
    assert rules.request_approvals(run, wf, now()) == []
    assert types(run) == [ev.ApprovalRequested.type_name]
    ended = held(wf)
    ended.cancel(ev.RunCancelled(reason="stop"))
    ended.collect_events()
    assert rules.request_approvals(ended, wf, now()) == [] and types(ended) == []


def test_grant_releases_a_gated_job() -> None:
    wf = workflow(a=GATED)
    run, _ = requested(wf, now(), {"env": "prod"})
    assert rules.apply_decision(run, verdict(run), "ann", grant=True, snapshot_id="snap-1", now=now()) is None
    assert types(run) == [ev.ApprovalGranted.type_name] and run.steps["a"].status == "released"


def test_grant_completes_an_approval_step() -> None:
    wf = workflow(a={"type": "approval", "approvers": "lead"})
    run, _ = requested(wf, now())
    rules.apply_decision(run, verdict(run, role="lead"), "ann", grant=True, snapshot_id="snap-1", now=now())
    assert types(run) == [ev.ApprovalGranted.type_name, ev.StepSucceeded.type_name]
    assert run.steps["a"].output == {"approved_by": "ann", "reason": "looks fine"}


def test_reject_fails_the_step() -> None:
    wf = workflow(a=GATED)
    run, _ = requested(wf, now(), {"env": "prod"})
    assert rules.apply_decision(run, verdict(run), "ann", grant=False, snapshot_id="snap-2", now=now()) is None
    assert types(run) == [ev.ApprovalRejected.type_name, ev.StepFailed.type_name]
    error = run.steps["a"].error
    assert run.steps["a"].status == "failed" and error is not None
    assert (error.kind, error.message) == ("approval_rejected", "rejected by ann: looks fine")


def test_a_grant_after_the_policy_changed_sends_the_job_back_to_policy() -> None:
    wf = workflow(a=GATED)
    run, _ = requested(wf, now(), {"env": "prod"})
    why = rules.apply_decision(run, verdict(run), "ann", grant=True, snapshot_id="snap-2", now=now())
    assert why == "policy changed from snap-1 to snap-2 while the request waited"
    assert types(run) == [ev.ApprovalInvalidated.type_name]
    state = run.steps["a"]
    assert (state.status, state.decision, state.approval) == ("ready", None, None)


def test_decisions_the_request_does_not_allow_are_refused() -> None:
    wf = workflow(a=GATED)
    t0 = now()
    run, _ = requested(wf, t0, {"env": "prod"}, approval_expires_ms=1000)
    # another job hash is refused, whatever the snapshot (it never invalidates the request)
    with pytest.raises(IllegalTransition, match="job hash"):
        rules.apply_decision(run, verdict(run, job_hash="f" * 64), "ann", grant=True, snapshot_id="snap-2", now=t0)
    with pytest.raises(IllegalTransition, match="role 'dev' may not decide"):
        rules.apply_decision(run, verdict(run, role="dev"), "ann", grant=True, snapshot_id="snap-1", now=t0)
    with pytest.raises(IllegalTransition, match="expired"):
        rules.apply_decision(run, verdict(run), "ann", grant=True, snapshot_id="snap-1", now=t0 + timedelta(seconds=2))
    assert run.steps["a"].status == "awaiting_approval"


def test_a_principal_without_the_role_or_with_another_hash_is_refused_on_the_record() -> None:
    wf = workflow(a=GATED)
    run, _ = requested(wf, now(), {"env": "prod"})
    ok = verdict(run)
    # nobody registered (roles None): the role the decision names is trusted
    assert rules.refusal(run, ok, "ann", None, grant=True) is None
    assert rules.refusal(run, ok, "ann", {"sre", "dev"}, grant=True) is None
    cases = [
        (ok, {"dev"}, "'mallory' lacks role 'sre' (holds dev)"),
        (ok, set(), "'mallory' lacks role 'sre' (is not a registered approver)"),
        (verdict(run, role="dev"), None, "'mallory' decided as role 'dev'; the request needs role 'sre'"),
        (verdict(run, job_hash="f" * 64), {"sre"}, "the decision is for job hash ffffffffffff…"),
    ]
    for decision, roles, reason in cases:
        refused = rules.refusal(run, decision, "mallory", roles, grant=False)
        assert refused is not None and refused.reason.startswith(reason), (roles, refused)
        assert (refused.principal, refused.required_role, refused.decision) == ("mallory", "sre", "reject")
        message = rules.refusal_message(run.run_id, refused)
        assert message.startswith(f"'mallory' may not reject step 'a' of run {run.run_id}: ")
        run.refuse_approval(refused)
    assert types(run) == [ev.ApprovalRefused.type_name] * len(cases)
    approval = run.steps["a"].approval
    assert run.steps["a"].status == "awaiting_approval" and approval is not None and approval.status == "requested"
    # a decided request is not refused here: the aggregate says why it cannot be decided
    rules.apply_decision(run, ok, "ann", grant=True, snapshot_id="snap-1", now=now())
    assert rules.refusal(run, ok, "mallory", {"dev"}, grant=True) is None
    with pytest.raises(IllegalTransition, match="no approval is pending"):
        run.refuse_approval(ev.ApprovalRefused(step_id="a", principal="x", role="sre", job_hash="h", reason="r"))


def test_expiry_fails_the_step_once_the_request_is_due() -> None:
    wf = workflow(a=GATED)
    t0 = now()
    run, [expiry] = requested(wf, t0, {"env": "prod"}, approval_expires_ms=1000)
    rules.expire(run, expiry, t0 + timedelta(milliseconds=500))  # fired early (or a newer request): nothing
    assert types(run) == []
    rules.expire(run, expiry, t0 + timedelta(seconds=1))
    assert types(run) == [ev.ApprovalExpired.type_name, ev.StepFailed.type_name]
    error = run.steps["a"].error
    assert run.steps["a"].status == "failed" and error is not None and error.kind == "approval_expired"
    rules.expire(run, expiry, t0 + timedelta(seconds=5))  # a second delivery: nothing pending
    assert types(run) == []


def test_expiry_after_a_decision_or_the_run_end_does_nothing() -> None:
    wf = workflow(a=GATED)
    t0 = now()
    run, [expiry] = requested(wf, t0, {"env": "prod"}, approval_expires_ms=1000)
    rules.apply_decision(run, verdict(run), "ann", grant=True, snapshot_id="snap-1", now=t0)
    run.collect_events()
    rules.expire(run, expiry, t0 + timedelta(hours=1))
    assert types(run) == []
    ended, [expiry] = requested(wf, t0, {"env": "prod"}, approval_expires_ms=1000)
    ended.cancel(ev.RunCancelled(reason="stop"))
    ended.collect_events()
    rules.expire(ended, expiry, t0 + timedelta(hours=1))
    assert types(ended) == []


def test_escalation_hands_the_request_on_once() -> None:
    wf = workflow(a=GATED)
    t0 = now()
    run, [_, escalation] = requested(wf, t0, {"env": "prod"}, approval_expires_ms=60_000, escalate_after_ms=1000,
                                     escalate_to_role="director")
    rules.escalate(run, escalation)
    assert types(run) == [ev.ApprovalEscalated.type_name]
    approval = run.steps["a"].approval
    assert approval is not None and approval.approver_role == "director"
    rules.escalate(run, escalation)  # already escalated
    assert types(run) == []
    rules.apply_decision(run, verdict(run, role="director"), "ann", grant=True, snapshot_id="snap-1", now=now())
    assert types(run) == [ev.ApprovalGranted.type_name]


def test_escalation_timer_of_a_replaced_request_does_nothing() -> None:
    wf = workflow(a=GATED)
    t0 = now()
    run, [escalation] = requested(wf, t0, {"env": "prod"}, escalate_after_ms=1000, escalate_to_role="director")
    # the request this timer was for was replaced by one escalating later
    rules.escalate(run, escalation.model_copy(update={"due_at": t0}))
    assert types(run) == []
    approval = run.steps["a"].approval
    assert approval is not None and approval.approver_role == "sre"


def test_no_escalation_without_a_role_to_escalate_to() -> None:
    wf = workflow(a=GATED)
    t0 = now()
    run, _ = requested(wf, t0, {"env": "prod"})
    approval = run.steps["a"].approval
    assert approval is not None
    approval.escalate_at = t0  # a request escalating at t0, but its decision names no role
    rules.escalate(run, fired(run, "approval_escalation", t0))
    assert types(run) == []
