"""The policy service's pure rules for a ready step (issue 15): the one builder of its PolicyDecided,
the job hash check of a request, and what recording a decision does to a run."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from interlock.contracts import authorship as a
from interlock.contracts import events as ev
from interlock.core.policy import JobRequest, PolicyOutcome, decide_step, hash_problem, record_decision
from interlock.core.run import IllegalTransition
from tests.unit.run_builders import started_run, workflow


class Engine:
    """Decides every job as it is told, and keeps what it was asked."""

    snapshot_id = "snap-7"

    def __init__(self, outcome: PolicyOutcome) -> None:
        self.outcome = outcome
        self.asked: list[JobRequest] = []

    def decide(self, request: JobRequest) -> PolicyOutcome:
        self.asked.append(request)
        return self.outcome


def test_the_decision_of_a_ready_step_carries_snapshot_rules_and_job_hash() -> None:
    wf = workflow(a={"topic": "t.a", "input": {"x": 1}, "labels": {"cost": "high"}})
    run = started_run(wf)
    state = run.steps["a"]
    engine = Engine(PolicyOutcome("require_approval", "snap-7", ["r-cost"], reason="costly", approver_role="lead",
                                  approval_expires_ms=60_000, constraints={"max_tokens": 100}))
    decided = decide_step(engine, wf, tenant=run.tenant, step_id="a", step_type=state.step_type, topic=state.topic,
                          job_input=state.input, job_hash=state.job_hash, now=datetime.now(UTC),
                          capabilities=("gpu",), agent_version="2.1")
    assert (decided.step_id, decided.decision, decided.snapshot_id, decided.rule_ids, decided.job_hash) == (
        "a", "require_approval", "snap-7", ["r-cost"], state.job_hash)
    assert (decided.approver_role, decided.approval_expires_ms, decided.constraints) == ("lead", 60_000,
                                                                                          {"max_tokens": 100})
    assert decided.signed is None  # the service signs it only when it answers a request
    asked = engine.asked[0]
    assert (asked.labels, asked.input, asked.capabilities, asked.agent_version) == ({"cost": "high"}, {"x": 1},
                                                                                    ("gpu",), "2.1")
    # what the policy service signs states exactly this decision, and gives it back unchanged
    statement = a.policy_statement(run.tenant, str(run.id), decided, "2026-12-02T13:00:00Z")
    signed = a.SignedPolicyDecision(statement=statement, key_id="U", signature="sig")
    assert a.policy_decided(signed).model_copy(update={"signed": None}) == decided


def test_a_request_whose_job_hash_is_not_its_inputs_is_refused() -> None:
    wf = workflow(a={"topic": "t.a", "input": {"x": 1}})
    state = started_run(wf).steps["a"]
    assert hash_problem(wf, step_id="a", topic=state.topic, job_input=state.input, claimed=state.job_hash) is None
    # another input, topic or step under the same hash: the decision would be bound to a job it was not made on
    assert hash_problem(wf, step_id="a", topic=state.topic, job_input={"x": 2}, claimed=state.job_hash)
    assert hash_problem(wf, step_id="a", topic="t.other", job_input=state.input, claimed=state.job_hash)
    assert hash_problem(wf, step_id="b", topic=state.topic, job_input=state.input, claimed=state.job_hash)


def decision(step_id: str, job_hash: str, verdict: ev.Decision) -> ev.PolicyDecided:
    return ev.PolicyDecided(step_id=step_id, decision=verdict, snapshot_id="snap-7", rule_ids=["r1"],
                            job_hash=job_hash, reason="" if verdict != "deny" else "no")


def test_recording_a_decision_allows_or_ends_the_run_denied() -> None:
    wf = workflow(a={"topic": "t.a"}, b={"topic": "t.b"})
    run = started_run(wf)
    record_decision(run, decision("a", run.steps["a"].job_hash, "allow"))
    assert run.steps["a"].decision is not None and not run.terminal
    record_decision(run, decision("b", run.steps["b"].job_hash, "deny"))
    assert run.status == "denied" and run.terminal
    denied = [e for e in run.collect_events() if isinstance(e.data, ev.RunDenied)]
    assert [(d.data.step_id, d.data.rule_ids, d.data.snapshot_id) for d in denied] == [("b", ["r1"], "snap-7")]


def test_a_step_decided_already_or_for_another_job_is_not_decided() -> None:
    wf = workflow(a={"topic": "t.a"})
    run = started_run(wf)
    job_hash = run.steps["a"].job_hash
    with pytest.raises(IllegalTransition):
        record_decision(run, decision("a", "f" * 64, "allow"))
    record_decision(run, decision("a", job_hash, "allow"))
    with pytest.raises(IllegalTransition):  # the consumer path skips it: it is no longer ready
        record_decision(run, decision("a", job_hash, "allow"))
