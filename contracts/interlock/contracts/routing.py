"""Which service is delivered which commit: the ``writer`` and ``route`` tokens of a commit's subject.

A commit is appended on ``subjects.commit_subject(tenant, run_id, writer, route)``. Each service's
events consumer is filtered (server side) to the commits it acts on or needs to keep its cached
runs whole, so a commit is decoded, checked and applied only where it matters:

- planner, policy and dispatcher: every commit another writer appended (their own commits they
  applied as they appended them; a copy that misses one another copy wrote replays the gap);
- approval: only commits whose route is :data:`APPROVAL` (a decision that waits for a person);
- the dispatcher also gets its own commits whose route is :data:`RETRY` (a retry it scheduled:
  the timer it schedules after the commit is restored on delivery if a crash lost it);
- auditor: everything.

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
RETRY = "retry"
"""Route of a commit that schedules a retry (its writer, the dispatcher, gets it back)."""
FLOW = "flow"
"""Route of every other commit."""

_ANY = "*"


def needs_a_person(envelope: Mapping[str, Any]) -> bool:
    """Whether the approval service acts on this event: a decision that waits for a person."""
    if envelope.get("type") != ev.PolicyDecided.type_name:
        return False
    data = envelope.get("data") or {}
    # decisions recorded before step_type existed carry none: look at those runs to be safe
    return bool(data.get("decision") == "require_approval" or data.get("step_type", "approval") == "approval")


def route_of(envelopes: Iterable[Mapping[str, Any]]) -> str:
    """The route token of a commit holding ``envelopes``."""
    events = list(envelopes)
    if any(needs_a_person(e) for e in events):
        return APPROVAL
    return RETRY if any(e.get("type") == ev.RetryScheduled.type_name for e in events) else FLOW


def _commits(writer: str = _ANY, route: str = _ANY) -> str:
    return f"{s.PREFIX}.evt.{_ANY}.{_ANY}.{writer}.{route}"


def consumer_filters(service: str) -> tuple[str, ...]:
    """The filter subjects of ``service``'s consumer on ``IL_EVENTS`` (non-overlapping)."""
    if service == "approval":
        return (_commits(route=APPROVAL),)
    if service in WRITERS:
        own = (_commits(writer=service, route=RETRY),) if service == "dispatcher" else ()
        return (*(_commits(writer=w) for w in WRITERS if w != service), *own)
    return (s.EVENTS_ALL,)


__all__ = ["APPROVAL", "FLOW", "RETRY", "WRITERS", "consumer_filters", "needs_a_person", "route_of"]
