"""Which service is delivered which commit: the ``writer``, ``route`` and ``lane`` tokens of a commit's subject.

A commit is appended on ``subjects.commit_subject(tenant, run_id, writer, route, lane)``. Each service's
events consumer is filtered (server side) to the commits it acts on or needs to keep its cached
runs whole, so a commit is decoded, checked and applied only where it matters:

- planner, policy and dispatcher: every commit another writer appended (their own commits they
  applied as they appended them; a copy that misses one another copy wrote replays the gap);
- approval: only commits whose route is :data:`APPROVAL` (a decision that waits for a person);
- a writer also gets back its own commits whose route is :data:`AGAIN`: those holding an event it
  acts on in a later pass (:data:`ACTS_ON_OWN`: the planner plans again after a step it failed,
  skipped or completed itself; the dispatcher restores the timer of a retry it scheduled);
- auditor: everything.

:data:`ACTS_ON` says which event types each service acts on (its handler is called for a commit
holding one); the rest of what it is delivered only keeps its cached runs current.

Lanes (#16): a run of priority :data:`FAST_LANE_PRIORITY` or more appends every commit in the fast
lane (:func:`lane_of`), every other run in the slow lane. Planner, policy and dispatcher have one
consumer per lane (:func:`consumer_filters` with a lane), and handle slow-lane commits only while no
fast-lane one is pending (``interlock.runtime.lanes``): a high-priority run's commits never queue
behind a backlog's. A lane orders work, never what is allowed: every commit of a run is still on
its log (``il.evt.{tenant}.{run_id}.>``), under the same expected-sequence condition.

The tokens are routing, not trust: who wrote a commit is proven by its signature, and a commit
with a misleading route only reaches the wrong consumers (each still checks it before acting).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import PRIORITY_DEFAULT

WRITERS = ("planner", "policy", "approval", "dispatcher")
"""The services that append to run logs (a commit's ``writer`` token)."""

APPROVAL = "approval"
"""Route of a commit the approval service acts on."""
AGAIN = "again"
"""Route of a commit its writer acts on again (:data:`ACTS_ON_OWN`)."""

ACTS_ON: dict[str, frozenset[str]] = {
    "planner": ev.kinds(ev.RunStarted, ev.StepSucceeded, ev.StepFailed, ev.StepSkipped, ev.StepExpanded,
                        ev.CompensationStarted,
                        ev.StepOutputSupplied),  # a person completed a step (issue 17): its dependants may be ready
    "policy": ev.kinds(ev.StepReady, ev.ApprovalInvalidated,
                       ev.StepRetryRequested),  # issue 17: decide again for the new input
    "dispatcher": ev.kinds(ev.PolicyDecided, ev.ApprovalGranted, ev.RunCancelled, ev.RunTimedOut, ev.RunFailed,
                           ev.RunDenied, ev.RetryScheduled,
                           ev.RunUnpaused),  # issue 17: what waited while the run was paused is dispatched now
}
"""The event types each service's commit handler acts on (the approval service: :func:`needs_a_person`)."""

ACTS_ON_OWN: dict[str, frozenset[str]] = {
    "planner": ACTS_ON["planner"] - ev.kinds(ev.RunStarted),  # a run's first plan is in its first commit
    "dispatcher": ev.kinds(ev.RetryScheduled),
}
"""Of those, the ones a service acts on when it wrote them itself (in a later pass)."""
FLOW = "flow"
"""Route of every other commit."""

_ANY = "*"


def needs_a_person(envelope: Mapping[str, Any]) -> bool:
    """Whether the approval service acts on this event: a decision that waits for a person (policy's,
    or a guard's verdict that holds a step's output for approval)."""
    data = envelope.get("data") or {}
    if envelope.get("type") == ev.GuardChecked.type_name:
        return bool(data.get("held"))
    if envelope.get("type") != ev.PolicyDecided.type_name:
        return False
    # decisions recorded before step_type existed carry none: look at those runs to be safe
    return bool(data.get("decision") == "require_approval" or data.get("step_type", "approval") == "approval")


def route_of(envelopes: Iterable[Mapping[str, Any]], writer: str = "") -> str:
    """The route token of a commit holding ``envelopes`` appended by ``writer``."""
    events = list(envelopes)
    if any(needs_a_person(e) for e in events):
        return APPROVAL
    again = ACTS_ON_OWN.get(writer, frozenset())
    return AGAIN if any(e.get("type") in again for e in events) else FLOW


FAST_LANE_PRIORITY = 4
"""The least run priority (1-5) whose commits travel in the fast lane."""

LANED = ("planner", "policy", "dispatcher")
"""The services with one events consumer per lane (the others take both lanes in one)."""


def lane_of(priority: int | None) -> str:
    """The lane of a run's commits from its priority (the trigger's, else the workflow's; none: the default)."""
    return s.FAST_LANE if (priority or PRIORITY_DEFAULT) >= FAST_LANE_PRIORITY else s.SLOW_LANE


def _commits(writer: str = _ANY, route: str = _ANY, lane: str | None = _ANY) -> str:
    """A commit filter; ``lane`` None: commits appended before lanes existed (no lane token)."""
    return f"{s.PREFIX}.evt.{_ANY}.{_ANY}.{writer}.{route}" + (f".{lane}" if lane is not None else "")


def _lanes(lane: str | None) -> tuple[str | None, ...]:
    # the slow lane also takes commits without a lane token (appended before lanes existed)
    if lane is None:
        return (_ANY, None)
    if lane not in s.LANES:
        raise s.SubjectError(f"lane {lane!r} is not one of {', '.join(s.LANES)}")
    return (lane, None) if lane == s.SLOW_LANE else (lane,)


def consumer_filters(service: str, lane: str | None = None) -> tuple[str, ...]:
    """The filter subjects of ``service``'s consumer on ``IL_EVENTS`` (non-overlapping): of one
    lane's commits, or of both (``lane`` None)."""
    lanes = _lanes(lane)
    if service == "approval":
        return tuple(_commits(route=APPROVAL, lane=ln) for ln in lanes)
    if service in WRITERS:
        own = [_commits(writer=service, route=AGAIN, lane=ln) for ln in lanes] if service in ACTS_ON_OWN else []
        return (*(_commits(writer=w, lane=ln) for w in WRITERS if w != service for ln in lanes), *own)
    return (s.EVENTS_ALL,)


__all__ = ["ACTS_ON", "ACTS_ON_OWN", "AGAIN", "APPROVAL", "FAST_LANE_PRIORITY", "FLOW", "LANED", "WRITERS",
           "consumer_filters", "lane_of", "needs_a_person", "route_of"]
