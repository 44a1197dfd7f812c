"""CedarPolicy without I/O: allow, deny, approval, constraints, what rules match on, admission, errors."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime
from typing import Any

import cedarpy
import pytest

from interlock.core.policy.cedar import DEFAULT_BUNDLE, CedarPolicy, PolicyBundle, PolicyError
from interlock.core.policy.engine import JobRequest

NOON = datetime(2024, 5, 15, 12, 30, tzinfo=UTC)  # a Wednesday (isoweekday 3)
NIGHT = datetime(2024, 5, 18, 3, 0, tzinfo=UTC)  # a Saturday (isoweekday 6)

ALLOW_ALL = """
@id("allow-start") permit(principal, action == Action::"start", resource);
@id("allow-all") permit(principal, action == Action::"dispatch", resource);
@id("unattended") permit(principal, action == Action::"dispatch_unattended", resource);
"""


def req(**changes: Any) -> JobRequest:
    base = JobRequest(
        tenant="acme", workflow_id="deploy", workflow_version="3", step_id="apply", step_type="job",
        topic="k8s.apply", labels={}, input={"env": "dev"}, job_hash="h" * 64, require_approval=False,
        approvers="approver", now=NOON,
    )
    return dataclasses.replace(base, **changes)


def policy(source: str, version: str = "1") -> CedarPolicy:
    return CedarPolicy(PolicyBundle.of(version, source))


def admit(engine: CedarPolicy, **changes: Any) -> Any:
    args: dict[str, Any] = {"tenant": "acme", "workflow_id": "deploy", "workflow_version": "3",
                            "run_input": {"env": "dev"}, "idempotency_key": "key-1", "requested_by": "ci",
                            "now": NOON}
    args.update(changes)
    return engine.admit(**args)


# -- bundles and snapshots -------------------------------------------------------------------
def test_snapshot_id_is_version_and_sha_prefix() -> None:
    bundle = PolicyBundle.of("7", ALLOW_ALL)
    assert bundle.sha256 == hashlib.sha256(ALLOW_ALL.encode()).hexdigest()
    assert bundle.snapshot_id == f"7@{bundle.sha256[:12]}"
    engine = CedarPolicy(bundle)
    assert engine.snapshot_id == bundle.snapshot_id
    assert engine.decide(req()).snapshot_id == bundle.snapshot_id
    assert PolicyBundle.of("7", ALLOW_ALL + "\n").snapshot_id != bundle.snapshot_id, "content changes the snapshot"


@pytest.mark.parametrize("source", [
    "permit(principal, action, resource",
    'permit(principal, action == Action::"dispatch", resource) when { resource.topic == };',
    'permit(principal, action == Action::"dispatch", resource) when { resource.topic like };',
    "allow everything;",
])
def test_a_bundle_that_does_not_parse_raises_policy_error_with_the_parser_message(source: str) -> None:
    with pytest.raises(ValueError) as parser:
        cedarpy.PolicySet.from_str(source)
    with pytest.raises(PolicyError) as raised:
        policy(source, version="broken")
    message = str(raised.value)
    assert "broken" in message and "does not parse" in message
    assert str(parser.value) in message, f"the parser's own message must be kept: {message}"


def test_unnamed_policies_are_named_by_position() -> None:
    engine = policy("""
permit(principal, action == Action::"dispatch", resource);
forbid(principal, action == Action::"dispatch", resource) when { resource.topic == "x" };
""")
    assert engine.decide(req()).rule_ids[0] == "policy0"
    denied = engine.decide(req(topic="x"))
    assert denied.decision == "deny"
    assert denied.rule_ids == ["policy1"]
    assert denied.reason == "forbidden by policy1"


# -- allow / deny ----------------------------------------------------------------------------
def test_allow_names_the_permits_that_decided() -> None:
    outcome = policy(ALLOW_ALL).decide(req())
    assert outcome.decision == "allow"
    assert sorted(outcome.rule_ids) == ["allow-all", "unattended"]
    assert outcome.reason == ""
    assert outcome.approver_role is None and outcome.constraints == {}


def test_deny_carries_the_reason_and_rule_id() -> None:
    engine = policy(ALLOW_ALL + """
@id("no-prod-db")
@reason("production databases are frozen")
forbid(principal, action == Action::"dispatch", resource) when { resource.topic == "db.migrate" };
""")
    outcome = engine.decide(req(topic="db.migrate"))
    assert outcome.decision == "deny"
    assert outcome.rule_ids == ["no-prod-db"]
    assert outcome.reason == "production databases are frozen"
    assert outcome.snapshot_id == engine.snapshot_id
    assert engine.decide(req(topic="db.migrate.v2")).decision == "allow", "== is exact, not a prefix"


def test_every_matching_forbid_is_named_and_deny_wins_over_approval() -> None:
    engine = policy(ALLOW_ALL + """
@id("freeze") @reason("change freeze")
forbid(principal, action == Action::"dispatch", resource) when { resource.workflow == "deploy" };
@id("no-k8s") @reason("k8s is read-only")
forbid(principal, action == Action::"dispatch", resource) when { resource.topic like "k8s.*" };
@id("needs-sre") @approver_role("sre")
forbid(principal, action == Action::"dispatch_unattended", resource);
""")
    outcome = engine.decide(req())
    assert outcome.decision == "deny"
    assert sorted(outcome.rule_ids) == ["freeze", "no-k8s"]
    assert set(outcome.reason.split("; ")) == {"change freeze", "k8s is read-only"}
    assert outcome.approver_role is None


def test_nothing_permits_means_default_deny() -> None:
    for source in ("", '@id("only-start") permit(principal, action == Action::"start", resource);',
                   '@id("other") permit(principal, action == Action::"dispatch", resource) '
                   'when { resource.workflow == "other" };'):
        outcome = policy(source).decide(req())
        assert outcome.decision == "deny", source
        assert outcome.rule_ids == ["default-deny"]
        assert outcome.reason == "no policy permits this job"


def test_a_permit_for_unattended_alone_does_not_allow_dispatch() -> None:
    outcome = policy('permit(principal, action == Action::"dispatch_unattended", resource);').decide(req())
    assert outcome.decision == "deny" and outcome.rule_ids == ["default-deny"]


# -- approval --------------------------------------------------------------------------------
def test_require_approval_with_role_expiry_and_escalation() -> None:
    engine = policy(ALLOW_ALL + """
@id("prod-needs-sre")
@reason("production changes need an SRE")
@approver_role("sre")
@approval_expires_ms("60000")
@escalate_after_ms("300000")
@escalate_to_role("sre-lead")
forbid(principal, action == Action::"dispatch_unattended", resource) when { context.input.env == "prod" };
""")
    outcome = engine.decide(req(input={"env": "prod"}))
    assert outcome.decision == "require_approval"
    assert outcome.approver_role == "sre"
    assert outcome.approval_expires_ms == 60000
    assert outcome.escalate_after_ms == 300000
    assert outcome.escalate_to_role == "sre-lead"
    assert outcome.reason == "production changes need an SRE"
    assert "prod-needs-sre" in outcome.rule_ids and "allow-all" in outcome.rule_ids
    assert "unattended" not in outcome.rule_ids, "the permit that was overridden did not decide"
    assert engine.decide(req(input={"env": "dev"})).decision == "allow"


def test_require_approval_without_annotations_uses_the_workflows_approvers() -> None:
    engine = policy("""
@id("allow-all") permit(principal, action == Action::"dispatch", resource);
""")  # nothing permits running unattended
    outcome = engine.decide(req(approvers="ops-oncall"))
    assert outcome.decision == "require_approval"
    assert outcome.approver_role == "ops-oncall"
    assert outcome.approval_expires_ms is None and outcome.escalate_after_ms is None
    assert outcome.escalate_to_role is None
    assert outcome.reason == "policy requires a person to approve this job"
    assert outcome.rule_ids == ["allow-all"]


def test_non_numeric_expiry_is_ignored() -> None:
    engine = policy(ALLOW_ALL + """
@id("gate") @approver_role("sre") @approval_expires_ms("soon") @escalate_after_ms("-5")
forbid(principal, action == Action::"dispatch_unattended", resource);
""")
    outcome = engine.decide(req())
    assert outcome.decision == "require_approval"
    assert outcome.approval_expires_ms is None and outcome.escalate_after_ms is None


def test_a_step_marked_for_approval_needs_one_even_when_policy_would_let_it_run() -> None:
    outcome = policy(ALLOW_ALL).decide(req(require_approval=True, approvers="release-managers"))
    assert outcome.decision == "require_approval"
    assert outcome.approver_role == "release-managers"
    assert outcome.reason == "the workflow marks this step for approval"


def test_default_bundle_lets_jobs_run_except_high_risk_ones() -> None:
    engine = CedarPolicy(DEFAULT_BUNDLE)
    allowed = engine.decide(req())
    assert allowed.decision == "allow"
    assert set(allowed.rule_ids) == {"allow-all", "unattended-unless-high-risk"}
    held = engine.decide(req(labels={"risk": "high"}))
    assert held.decision == "require_approval"
    assert "high-risk-needs-approval" in held.rule_ids
    assert held.reason == "high-risk jobs need a person's approval"
    assert admit(engine).decision == "allow"


# -- constraints -----------------------------------------------------------------------------
def test_constraints_come_from_the_permits_that_allowed_the_job() -> None:
    engine = policy("""
@id("allow-k8s")
@constraint_max_runtime_s("600")
@constraint_namespace("staging")
permit(principal, action == Action::"dispatch", resource) when { resource.topic like "k8s.*" };
@id("allow-db")
@constraint_read_only("true")
permit(principal, action == Action::"dispatch", resource) when { resource.topic like "db.*" };
@id("unattended") @constraint_ignored("unattended permits do not hand out constraints")
permit(principal, action == Action::"dispatch_unattended", resource);
""")
    k8s = engine.decide(req(topic="k8s.apply"))
    assert k8s.decision == "allow"
    assert k8s.constraints == {"max_runtime_s": "600", "namespace": "staging"}
    db = engine.decide(req(topic="db.query"))
    assert db.constraints == {"read_only": "true"}
    assert "id" not in db.constraints and "reason" not in db.constraints


def test_constraints_are_kept_when_the_job_needs_approval() -> None:
    engine = policy("""
@id("allow") @constraint_dry_run("false")
permit(principal, action == Action::"dispatch", resource);
@id("gate") @approver_role("sre")
forbid(principal, action == Action::"dispatch_unattended", resource);
""")
    outcome = engine.decide(req())
    assert outcome.decision == "require_approval"
    assert outcome.constraints == {"dry_run": "false"}


# -- what rules can match on -----------------------------------------------------------------
def forbid_when(condition: str, rule: str = "r") -> CedarPolicy:
    return policy(ALLOW_ALL + f"""
@id("{rule}") @reason("matched {rule}")
forbid(principal, action == Action::"dispatch", resource) when {{ {condition} }};
""")


def decisions(engine: CedarPolicy, *requests: JobRequest) -> list[str]:
    return [engine.decide(r).decision for r in requests]


def test_matching_on_tenant() -> None:
    by_resource = forbid_when('resource.tenant == "globex"')
    by_principal = forbid_when('principal.tenant == "globex"')
    for engine in (by_resource, by_principal):
        assert decisions(engine, req(tenant="acme"), req(tenant="globex")) == ["allow", "deny"]


def test_matching_on_workflow_version_step_and_step_type() -> None:
    assert decisions(forbid_when('resource.workflow == "deploy"'),
                     req(), req(workflow_id="backup")) == ["deny", "allow"]
    assert decisions(forbid_when('principal == Workflow::"deploy"'),
                     req(), req(workflow_id="backup")) == ["deny", "allow"]
    assert decisions(forbid_when('principal.version == "3"'),
                     req(), req(workflow_version="4")) == ["deny", "allow"]
    assert decisions(forbid_when('resource.step == "apply"'),
                     req(), req(step_id="plan")) == ["deny", "allow"]
    assert decisions(forbid_when('resource.step_type == "notify"'),
                     req(), req(step_type="notify", topic=None)) == ["allow", "deny"]


def test_matching_on_topic_globs() -> None:
    engine = forbid_when('resource.topic like "db.*"', rule="no-db")
    assert decisions(engine, req(topic="db.migrate"), req(topic="db.users.drop"), req(topic="db"),
                     req(topic="k8s.db.apply"), req(topic=None)) == ["deny", "deny", "allow", "allow", "allow"]
    assert engine.decide(req(topic="db.migrate")).rule_ids == ["no-db"]
    middle = forbid_when('resource.topic like "*.prod.*"')
    assert decisions(middle, req(topic="k8s.prod.apply"), req(topic="k8s.staging.apply")) == ["deny", "allow"]


def test_matching_on_risk_and_other_labels() -> None:
    risky = forbid_when('resource.risk == "high"')
    assert decisions(risky, req(labels={"risk": "high"}), req(labels={"risk": "low"}), req()) \
        == ["deny", "allow", "allow"]
    team = forbid_when('resource.labels has team && resource.labels.team == "payments"')
    assert decisions(team, req(labels={"team": "payments"}), req(labels={"team": "search"}), req()) \
        == ["deny", "allow", "allow"]


def test_matching_on_agent_capabilities_and_version() -> None:
    ssh = forbid_when('resource.capabilities.contains("ssh")', rule="no-ssh")
    assert decisions(ssh, req(capabilities=("http", "ssh")), req(capabilities=("http",)), req()) \
        == ["deny", "allow", "allow"]
    old = forbid_when('resource.agent_version == "0.9"')
    assert decisions(old, req(agent_version="0.9"), req(agent_version="1.0")) == ["deny", "allow"]


def test_matching_on_attributes_of_the_input() -> None:
    prod = forbid_when('context.input has env && context.input.env == "prod"')
    assert decisions(prod, req(input={"env": "prod"}), req(input={"env": "dev"}), req(input={}),
                     req(input=None), req(input=["not", "a", "record"])) == ["deny", "allow", "allow", "allow", "allow"]
    big = forbid_when("context.input has replicas && context.input.replicas > 10")
    assert decisions(big, req(input={"replicas": 50}), req(input={"replicas": 3})) == ["deny", "allow"]
    nested = forbid_when('context.input has target && context.input.target.region == "eu"')
    assert decisions(nested, req(input={"target": {"region": "eu"}}), req(input={"target": {"region": "us"}})) \
        == ["deny", "allow"]


def test_inputs_cedar_cannot_hold_are_converted_not_fatal() -> None:
    floats = forbid_when('context.input has ratio && context.input.ratio == "0.5"')
    assert decisions(floats, req(input={"ratio": 0.5, "missing": None, "huge": 2**70, "list": [1, None, 2.5]})) \
        == ["deny"]
    huge = forbid_when('context.input has huge && context.input.huge == "1180591620717411303424"')
    assert decisions(huge, req(input={"huge": 2**70})) == ["deny"]


def test_a_rule_that_errors_fails_closed_and_explain_reports_the_error() -> None:
    engine = forbid_when('context.input.env == "prod"', rule="unguarded")  # errors when input has no env
    assert engine.decide(req(input={"env": "prod"})).decision == "deny"
    assert engine.decide(req(input={"env": "dev"})).decision == "allow"
    failed = engine.decide(req(input={}))
    assert failed.decision == "deny" and "could not be evaluated" in failed.reason
    dispatch = engine.explain(req(input={}))[0]
    assert dispatch.action == "dispatch" and dispatch.decision == "allow"
    assert dispatch.errors, "the evaluation error must be visible in explain"


def test_matching_on_time() -> None:
    night = forbid_when("context.hour < 6 || context.hour >= 22", rule="no-night-work")
    assert decisions(night, req(now=NOON), req(now=NIGHT)) == ["allow", "deny"]
    weekend = forbid_when("context.weekday >= 6", rule="no-weekends")
    assert decisions(weekend, req(now=NOON), req(now=NIGHT)) == ["allow", "deny"]
    cutoff = forbid_when(f"context.now >= {int(datetime(2024, 5, 16, tzinfo=UTC).timestamp())}")
    assert decisions(cutoff, req(now=NOON), req(now=NIGHT)) == ["allow", "deny"]


def test_time_can_require_approval_instead_of_denying() -> None:
    engine = policy(ALLOW_ALL + """
@id("after-hours") @approver_role("oncall")
forbid(principal, action == Action::"dispatch_unattended", resource) unless { context.hour >= 9 && context.hour < 17 };
""")
    assert engine.decide(req(now=NOON)).decision == "allow"
    late = engine.decide(req(now=NIGHT))
    assert (late.decision, late.approver_role) == ("require_approval", "oncall")


# -- admission -------------------------------------------------------------------------------
def test_admission_allows_with_the_permit_that_decided() -> None:
    engine = policy(ALLOW_ALL)
    outcome = admit(engine)
    assert outcome.decision == "allow"
    assert outcome.rule_ids == ["allow-start"]
    assert outcome.snapshot_id == engine.snapshot_id


def test_admission_denies_when_no_permit_starts_the_workflow() -> None:
    engine = policy("""
@id("start-deploy-only") permit(principal, action == Action::"start", resource) when { resource.workflow == "deploy" };
@id("allow-all") permit(principal, action == Action::"dispatch", resource);
""")
    assert admit(engine).decision == "allow"
    denied = admit(engine, workflow_id="backup")
    assert denied.decision == "deny"
    assert denied.rule_ids == ["default-deny"]
    assert denied.reason == "no policy permits starting this workflow"
    # job permits do not admit runs
    assert admit(policy('permit(principal, action == Action::"dispatch", resource);')).decision == "deny"


def test_admission_forbids_match_on_tenant_requester_and_input() -> None:
    engine = policy(ALLOW_ALL + """
@id("no-bots") @reason("bots may not start runs")
forbid(principal, action == Action::"start", resource) when { resource.requested_by like "bot:*" };
@id("globex-suspended") @reason("tenant suspended")
forbid(principal, action == Action::"start", resource) when { resource.tenant == "globex" };
@id("no-prod-at-night")
forbid(principal, action == Action::"start", resource)
when { context.input has env && context.input.env == "prod" && context.hour < 6 };
""")
    assert admit(engine).decision == "allow"
    bot = admit(engine, requested_by="bot:renovate")
    assert (bot.decision, bot.rule_ids, bot.reason) == ("deny", ["no-bots"], "bots may not start runs")
    suspended = admit(engine, tenant="globex")
    assert (suspended.decision, suspended.rule_ids, suspended.reason) == ("deny", ["globex-suspended"],
                                                                          "tenant suspended")
    night = admit(engine, run_input={"env": "prod"}, now=NIGHT)
    assert (night.decision, night.rule_ids, night.reason) == ("deny", ["no-prod-at-night"],
                                                              "forbidden by no-prod-at-night")
    assert admit(engine, run_input={"env": "prod"}, now=NOON).decision == "allow"


def test_admission_does_not_consult_job_rules() -> None:
    engine = policy(ALLOW_ALL + """
@id("no-deploy-jobs") forbid(principal, action == Action::"dispatch", resource) when { resource.workflow == "deploy" };
""")
    assert admit(engine).decision == "allow"
    assert engine.decide(req()).decision == "deny"


# -- explain ---------------------------------------------------------------------------------
def test_explain_lists_the_matched_rules_per_action() -> None:
    engine = policy("""
@id("allow-all") permit(principal, action == Action::"dispatch", resource);
@id("allow-k8s") permit(principal, action == Action::"dispatch", resource) when { resource.topic like "k8s.*" };
@id("unattended") permit(principal, action == Action::"dispatch_unattended", resource);
@id("prod-gate") @approver_role("sre")
forbid(principal, action == Action::"dispatch_unattended", resource) when { context.input.env == "prod" };
@id("no-db") forbid(principal, action == Action::"dispatch", resource) when { resource.topic like "db.*" };
""")
    held = engine.explain(req(input={"env": "prod"}))
    assert [(e.action, e.decision) for e in held] == [("dispatch", "allow"), ("dispatch_unattended", "deny")]
    assert sorted(held[0].matched) == ["allow-all", "allow-k8s"]
    assert held[1].matched == ["prod-gate"]
    assert not held[0].errors and not held[1].errors

    free = engine.explain(req(input={"env": "dev"}))
    assert [(e.action, e.decision) for e in free] == [("dispatch", "allow"), ("dispatch_unattended", "allow")]
    assert free[1].matched == ["unattended"]

    denied = engine.explain(req(topic="db.drop", input={"env": "dev"}))
    assert (denied[0].decision, denied[0].matched) == ("deny", ["no-db"])

    nothing = policy("").explain(req())
    assert [(e.decision, e.matched) for e in nothing] == [("deny", []), ("deny", [])]
