"""The public surface of interlock.client, pinned: changing it is a decision, not an accident."""

from __future__ import annotations

import inspect

import interlock.client as client_pkg
from interlock.client import Client

PUBLIC = [
    "TERMINAL_EVENTS", "Client", "ClientError", "ClientSettings", "DeadLetterEntry", "NotFound", "PendingApproval",
    "PolicyChange", "PolicyDecision", "PolicyRevision", "PolicyRuleMatch", "PolicySimulation", "Refused", "RerunPlan",
    "Unavailable", "WorkflowInvalid", "describe_event", "progress_line", "timeline_line",
]

CLIENT_METHODS = [
    "agents", "alerts", "api_key", "api_keys", "apply_workflow", "approvals", "approve", "approvers", "breaker_log",
    "breakers", "cancel",
    "check_api_key", "close", "connect", "create_api_key", "dead_letter_entries", "dead_letters", "events",
    "export_run", "failures", "feedback", "give_feedback", "grant_approver", "keyring", "load_run", "pause_run",
    "pending_approval", "policy_active", "policy_decide", "policy_history", "policy_publish", "policy_rollback",
    "policy_simulate", "queue_depth", "read_commits", "reject", "replay_dead_letter", "rerun", "rerun_plan",
    "resolve_dead_letter", "resume_run", "retry_step", "revoke_api_key", "revoke_approver", "rollout_abort",
    "rollout_clear", "rollout_start", "rollouts", "run_diff", "runs", "runs_page", "schedules", "seals",
    "skip_step", "start_run", "status", "submit_run", "timeline", "unpause_run", "unseal", "usage", "verify",
    "verify_seals", "wait", "wait_projected", "watch", "with_tenant", "workflow", "workflows",
]


def test_all_is_pinned_and_every_name_resolves() -> None:
    assert client_pkg.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(client_pkg, name) is not None, name


def test_nothing_private_leaks_through_the_package() -> None:
    public = {n for n in vars(client_pkg) if not n.startswith("_")} - {"annotations"}  # the __future__ import
    assert public == set(PUBLIC)


def test_the_errors_are_one_family() -> None:
    for name in ("NotFound", "Refused", "Unavailable"):
        assert issubclass(getattr(client_pkg, name), client_pkg.ClientError), name


def test_client_methods_are_pinned_and_documented() -> None:
    methods = sorted(n for n, _ in inspect.getmembers(Client, callable) if not n.startswith("_"))
    assert methods == CLIENT_METHODS
    undocumented = [n for n in methods if not (getattr(Client, n).__doc__ or "").strip()]
    assert undocumented == []
