"""The API's role table and key format (pure; the integration tests call every route with every role)."""

from __future__ import annotations

from interlock.api.access import ROLE_ACTIONS, Action, allows
from interlock.api.routes import route_actions
from interlock.identity import ROLES
from interlock.runtime.apikeys import API_KEY_ROLES, KEY_PREFIX, digest, key_id_of


def test_key_roles_are_the_person_roles_and_each_has_actions() -> None:
    assert set(API_KEY_ROLES) == {r.name for r in ROLES if r.kind == "person"} == set(ROLE_ACTIONS)
    assert all(Action.READ in actions for actions in ROLE_ACTIONS.values())


def test_the_table() -> None:
    expected = {
        "viewer": {Action.READ},
        "operator": {Action.READ, Action.OPERATE, Action.FEEDBACK},
        "approver": {Action.READ, Action.APPROVE, Action.FEEDBACK},
        "policy-admin": {Action.READ, Action.POLICY},
        "admin": set(Action),
    }
    assert {role: set(actions) for role, actions in ROLE_ACTIONS.items()} == expected
    assert not allows("nobody", Action.READ)


def test_routes_name_their_actions() -> None:
    table = route_actions()
    assert table[("POST", "/api/v1/workflows/{workflow_id}/runs")] is Action.OPERATE
    assert table[("POST", "/api/v1/approvals/{run_id}/{step_id}/approve")] is Action.APPROVE
    assert table[("POST", "/api/v1/approvals/{run_id}/{step_id}/reject")] is Action.APPROVE
    assert table[("POST", "/api/v1/policy/publish")] is Action.POLICY
    assert table[("POST", "/api/v1/api-keys")] is Action.ADMIN
    assert table[("GET", "/api/v1/workflow-runs")] is Action.READ
    assert table[("GET", "/api/v1/workflow-runs/{run_id}/events")] is Action.READ
    assert table[("GET", "/api/v1/workflow-runs/{run_id}/diff/{other_id}")] is Action.READ
    assert table[("GET", "/api/v1/workflow-runs/{run_id}/diff")] is Action.READ
    assert table[("GET", "/api/v1/workflows/{workflow_id}/failures")] is Action.READ
    for act in ("retry", "skip"):  # issue 17: intervening is operating, feedback its own action
        assert table[("POST", f"/api/v1/workflow-runs/{{run_id}}/steps/{{step_id}}/{act}")] is Action.OPERATE
    for act in ("resume", "pause", "unpause"):
        assert table[("POST", f"/api/v1/workflow-runs/{{run_id}}/{act}")] is Action.OPERATE
    assert table[("POST", "/api/v1/workflow-runs/{run_id}/steps/{step_id}/feedback")] is Action.FEEDBACK
    assert table[("GET", "/api/v1/workflows/{workflow_id}/feedback")] is Action.READ


def test_key_format() -> None:
    key = f"{KEY_PREFIX}_0123456789ab_" + "A" * 43
    assert key_id_of(key) == "0123456789ab"
    assert key_id_of(key + "x") is None and key_id_of("0123456789ab") is None and key_id_of("") is None
    assert digest(key) != digest(key[:-1] + "B") and len(digest(key)) == 64
