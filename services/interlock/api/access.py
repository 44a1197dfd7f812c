"""Which API key roles may do what: every route names one :class:`Action`; a role allows a set.

The roles are the person roles of :mod:`interlock.identity` (an API key acts as a person of its
tenant); the table is what ``interlock.api`` enforces and what the README shows.
"""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    READ = "read"  # runs, timelines, events, approvals, workflows, policy (active, history, eval), agents, audit
    OPERATE = "operate"  # start, cancel and rerun runs; retry and skip steps, resume, pause and unpause runs
    APPROVE = "approve"  # approve and reject pending approvals
    FEEDBACK = "feedback"  # rate and correct step outputs
    POLICY = "policy"  # publish, roll back and simulate policy bundles
    ADMIN = "admin"  # apply workflows, dead letters, API keys


ROLE_ACTIONS: dict[str, frozenset[Action]] = {
    "viewer": frozenset({Action.READ}),
    "operator": frozenset({Action.READ, Action.OPERATE, Action.FEEDBACK}),
    "approver": frozenset({Action.READ, Action.APPROVE, Action.FEEDBACK}),
    "policy-admin": frozenset({Action.READ, Action.POLICY}),
    "admin": frozenset(Action),
}


def allows(role: str, action: Action) -> bool:
    return action in ROLE_ACTIONS.get(role, frozenset())


def roles_allowed(action: Action) -> list[str]:
    return [role for role, actions in ROLE_ACTIONS.items() if action in actions]
