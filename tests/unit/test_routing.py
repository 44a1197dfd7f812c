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
    ready = [{"type": ev.StepReady.type_name, "data": {}}]
    assert _receivers("planner", ready) == {"policy", "dispatcher", "auditor"}
    assert _receivers("dispatcher", [{"type": ev.StepSucceeded.type_name}]) == {"planner", "policy", "auditor"}


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
            for route in (routing.APPROVAL, routing.AGAIN, routing.FLOW):
                subject = s.commit_subject("t", "r", writer, route)
                assert sum(_matches(f, subject) for f in filters) <= 1


def test_a_commit_subject_names_its_run_log() -> None:
    subject = s.commit_subject("acme", "run-1", "planner", routing.FLOW)
    assert s.parse_run_events(subject) == ("acme", "run-1")
    assert s.log_of(subject) == s.run_events("acme", "run-1")
    assert s.run_of(subject) == ("acme", "run-1")
    assert _matches(s.run_log("acme", "run-1"), subject)
    assert not _matches(s.run_log("acme", "run-10"), subject)
