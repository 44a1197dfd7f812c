"""Which consumer gets which commit: the writer and route tokens of a commit's subject."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nats.js.api import ConsumerConfig

from interlock.contracts import events as ev
from interlock.contracts import routing
from interlock.contracts import subjects as s


def _matches(filter_subject: str, subject: str) -> bool:
    f, t = filter_subject.split("."), subject.split(".")
    for i, token in enumerate(f):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(f) == len(t)


def _receivers(writer: str, envelopes: Sequence[Mapping[str, Any]]) -> set[str]:
    subject = s.commit_subject("acme", "run-1", writer, routing.route_of(envelopes, writer))
    services = (*routing.WRITERS, "auditor")
    return {svc for svc in services if any(_matches(f, subject) for f in routing.consumer_filters(svc))}


def decided(decision: str, step_type: str = "agent") -> dict[str, object]:
    return {"type": ev.PolicyDecided.type_name, "data": {"decision": decision, "step_type": step_type}}


def test_a_commit_reaches_the_other_writers_and_the_auditor_but_not_its_writer() -> None:
    succeeded = [{"type": ev.StepSucceeded.type_name}]
    assert _receivers("dispatcher", succeeded) == {"planner", "auditor"}
    assert _receivers("approval", succeeded) == {"planner", "dispatcher", "auditor"}


def test_the_policy_service_gets_only_the_steps_left_undecided() -> None:
    ready = {"type": ev.StepReady.type_name, "step_id": "a", "data": {}}
    decided_a = {"type": ev.PolicyDecided.type_name, "step_id": "a", "data": {"decision": "allow", "step_type": "job"}}
    # the planner's request went unanswered: the step is ready alone, the policy service decides it
    assert routing.route_of([ready], "planner") == routing.POLICY
    assert _receivers("planner", [ready]) == {"policy", "dispatcher", "auditor"}
    # the decision came back and is in the same commit: nothing for the policy service
    assert routing.route_of([ready, decided_a], "planner") == routing.FLOW
    assert _receivers("planner", [ready, decided_a]) == {"dispatcher", "auditor"}
    # one of two steps decided: the other is the policy service's
    ready_b = {**ready, "step_id": "b"}
    assert "policy" in _receivers("planner", [ready, decided_a, ready_b])
    # a retried step and an invalidated approval are decided again
    assert "policy" in _receivers("planner", [{"type": ev.StepRetryRequested.type_name}])
    assert "policy" in _receivers("approval", [{"type": ev.ApprovalInvalidated.type_name}])


def test_a_route_names_every_interest_its_commit_holds() -> None:
    ready = {"type": ev.StepReady.type_name, "step_id": "b", "data": {}}
    reused = {"type": ev.StepSucceeded.type_name, "step_id": "a", "attempt": 0}
    approval = {"type": ev.PolicyDecided.type_name, "step_id": "c",
                "data": {"decision": "require_approval", "step_type": "job"}}
    route = routing.route_of([reused, approval, ready], "planner")
    assert route == "approval_again_policy"
    assert _receivers("planner", [reused, approval, ready]) == {"planner", "policy", "approval", "dispatcher",
                                                                 "auditor"}
    assert set(routing.ROUTES) >= {routing.FLOW, routing.APPROVAL, routing.AGAIN, routing.POLICY, route}


def test_only_decisions_that_wait_for_a_person_reach_the_approval_service() -> None:
    assert "approval" not in _receivers("policy", [decided("allow")])
    assert "approval" in _receivers("policy", [decided("require_approval")])
    assert "approval" in _receivers("policy", [decided("allow", step_type="approval")])


def test_a_writer_gets_back_what_it_acts_on_in_a_later_pass() -> None:
    retry = [{"type": ev.StepFailed.type_name}, {"type": ev.RetryScheduled.type_name}]
    assert routing.route_of(retry, "dispatcher") == routing.AGAIN
    assert "dispatcher" in _receivers("dispatcher", retry)
    assert "dispatcher" not in _receivers("dispatcher", [{"type": ev.StepDispatched.type_name}])
    # an input the step's schema refuses fails it in the planner: the planner then ends the run
    failed = [{"type": ev.StepReady.type_name}, {"type": ev.StepFailed.type_name}]
    assert "planner" in _receivers("planner", failed)
    assert "planner" not in _receivers("planner", [{"type": ev.StepReady.type_name}])


def test_every_filter_list_is_valid_for_one_consumer() -> None:
    for svc in (*routing.WRITERS, "auditor"):
        filters = routing.consumer_filters(svc)
        assert len(set(filters)) == len(filters)
        ConsumerConfig(filter_subjects=list(filters))  # the shape nats-py sends
        # non-overlapping: no commit subject matches two filters of one consumer
        for writer in routing.WRITERS:
            for route in routing.ROUTES:
                subject = s.commit_subject("t", "r", writer, route)
                assert sum(_matches(f, subject) for f in filters) <= 1


def test_a_commit_subject_names_its_run_log() -> None:
    subject = s.commit_subject("acme", "run-1", "planner", routing.FLOW)
    assert s.parse_run_events(subject) == ("acme", "run-1")
    assert s.log_of(subject) == s.run_events("acme", "run-1")
    assert s.run_of(subject) == ("acme", "run-1")
    assert _matches(s.run_log("acme", "run-1"), subject)
    assert not _matches(s.run_log("acme", "run-10"), subject)
