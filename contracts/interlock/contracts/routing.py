"""Which service is delivered which commit: the ``writer`` and ``route`` tokens of a commit's subject.

A commit is appended on ``subjects.commit_subject(tenant, run_id, writer, route)``. Each service's
events consumer is filtered (server side) to the commits it acts on or needs to keep its cached
runs whole, so a commit is decoded, checked and applied only where it matters. The route token
names every interest a commit holds (:data:`APPROVAL`, :data:`AGAIN`, :data:`POLICY`, joined
with ``_`` in that order: ``approval_policy``), or :data:`FLOW` when it holds none:

- planner and dispatcher: every commit another writer appended (their own commits they applied
  as they appended them; a copy that misses one another copy wrote replays the gap);
- policy: only commits routed :data:`POLICY`: a step ready without its decision in the same commit
  (the planner's request to the policy service went unanswered), a retried step, an invalidated
  approval. Since the planner asks the policy service for the decisions of the steps it marks
  ready and appends them with the StepReady events (issue 15), the policy service decides from its
  consumer only what that fast path left, reading the run to the log's end first;
- approval: only commits routed :data:`APPROVAL` (a decision that waits for a person);
- a writer also gets back its own commits routed :data:`AGAIN`: those holding an event it acts
  on in a later pass (:data:`ACTS_ON_OWN`: the planner plans again after a step it failed,
  skipped or completed itself; the dispatcher restores the timer of a retry it scheduled);
- auditor: everything.

:data:`ACTS_ON` says which event types each service acts on (its handler is called for a commit
holding one); the rest of what it is delivered only keeps its cached runs current.

The tokens are routing, not trust: who wrote a commit is proven by its signature, and a commit
with a misleading route only reaches the wrong consumers (each still checks it before acting).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from interlock.contracts import events as ev
from interlock.contracts import subjects as s

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


POLICY = "policy"
"""Route of a commit the policy service must decide from (:func:`policy_must_decide`)."""

_INTERESTS = (APPROVAL, AGAIN, POLICY)
ROUTES: tuple[str, ...] = (FLOW, *("_".join(i for n, i in enumerate(_INTERESTS) if mask >> n & 1)
                                  for mask in range(1, 2 ** len(_INTERESTS))))
"""Every route token: :data:`FLOW`, or the interests a commit holds joined with ``_``."""


def policy_must_decide(envelopes: Iterable[Mapping[str, Any]]) -> bool:
    """Whether the policy service acts on a commit holding ``envelopes``: a step made ready whose
    decision is not in the same commit, a retried step, or an invalidated approval."""
    events = list(envelopes)
    decided = {e.get("step_id") for e in events if e.get("type") == ev.PolicyDecided.type_name}
    again = ev.kinds(ev.ApprovalInvalidated, ev.StepRetryRequested)
    return any((e.get("type") == ev.StepReady.type_name and e.get("step_id") not in decided)
               or e.get("type") in again for e in events)


def route_of(envelopes: Iterable[Mapping[str, Any]], writer: str = "") -> str:
    """The route token of a commit holding ``envelopes`` appended by ``writer``."""
    events = list(envelopes)
    again = ACTS_ON_OWN.get(writer, frozenset())
    held = (any(needs_a_person(e) for e in events), any(e.get("type") in again for e in events),
            writer != "policy" and policy_must_decide(events))
    return "_".join(i for i, h in zip(_INTERESTS, held, strict=True) if h) or FLOW


def _commits(writer: str = _ANY, route: str = _ANY) -> str:
    return f"{s.PREFIX}.evt.{_ANY}.{_ANY}.{writer}.{route}"


def _routes_with(interest: str) -> tuple[str, ...]:
    return tuple(r for r in ROUTES if interest in r.split("_"))


def consumer_filters(service: str) -> tuple[str, ...]:
    """The filter subjects of ``service``'s consumer on ``IL_EVENTS`` (non-overlapping)."""
    if service == "approval":
        return tuple(_commits(route=r) for r in _routes_with(APPROVAL))
    if service == "policy":
        return tuple(_commits(route=r) for r in _routes_with(POLICY))
    if service in WRITERS:
        own = tuple(_commits(writer=service, route=r) for r in _routes_with(AGAIN)) if service in ACTS_ON_OWN else ()
        return (*(_commits(writer=w) for w in WRITERS if w != service), *own)
    return (s.EVENTS_ALL,)


__all__ = ["ACTS_ON", "ACTS_ON_OWN", "AGAIN", "APPROVAL", "FLOW", "POLICY", "ROUTES", "WRITERS", "consumer_filters",
           "needs_a_person", "policy_must_decide", "route_of"]
