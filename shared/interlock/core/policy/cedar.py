"""Policies in Cedar (via cedarpy): allow, deny, or require approval, with the rules that decided.

A bundle is Cedar source. Every job about to run is checked twice:

1. ``Action::"dispatch"`` — may this job run at all? No permit, or any matching forbid, denies it
   (the forbid's ``@reason`` is the reason).
2. ``Action::"dispatch_unattended"`` — may it run without a person? If not, it needs approval:
   the deciding forbid's ``@approver_role`` and ``@approval_expires_ms`` say by whom and how fast.

Permits that allowed a job hand their ``@constraint_<name>("value")`` annotations to the worker.
A policy's ``@id("...")`` names it in the log; unnamed policies are ``policy0``, ``policy1``, …
Evaluation fails closed: a policy that errors for a job (say ``context.input.env`` on an input
without ``env``: guard with ``has``) denies it, or, in the unattended check, asks for approval.

The request as Cedar sees it:
- principal ``Workflow::"<workflow id>"`` with ``tenant`` and ``version``;
- resource ``Job::"<run>:<step>"`` with ``topic``, ``step``, ``step_type``, ``workflow``, ``tenant``,
  ``risk`` (the step's ``risk`` label or ``""``), ``labels`` (a record), ``capabilities`` (set of
  strings the registered agents for the topic offer) and ``agent_version``;
- context ``{input: <resolved input>, hour: 0-23 (UTC), weekday: 1-7 (Monday 1), now: epoch seconds}``.

Runs are admitted on submission with ``Action::"start"`` on ``Run::"<idempotency key>"`` (attributes
``workflow``, ``tenant``, ``requested_by``; the same context): a bundle must permit it, or runs
are denied. An approval request escalates to ``@escalate_to_role`` after ``@escalate_after_ms``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import cedarpy

from interlock.core.policy.engine import JobRequest, PolicyOutcome

UNATTENDED = "dispatch_unattended"


class PolicyError(ValueError):
    """A bundle that does not parse or validate."""


@dataclass(frozen=True)
class PolicyBundle:
    version: str
    source: str
    sha256: str = ""

    @property
    def snapshot_id(self) -> str:
        return f"{self.version}@{self.sha256[:12]}"

    @staticmethod
    def of(version: str, source: str) -> PolicyBundle:
        return PolicyBundle(version=version, source=source, sha256=hashlib.sha256(source.encode()).hexdigest())


@dataclass
class Explanation:
    """What happened in one evaluation, for ``interlock policy explain``."""

    action: str
    decision: str
    matched: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _cedar_value(value: Any) -> Any:
    """Cedar has no floats or nulls: keep what it can hold, stringify the rest."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else str(value)
    if isinstance(value, float):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _cedar_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_cedar_value(v) for v in value if v is not None]
    return str(value)


def _context(value: Any, now: datetime) -> dict[str, Any]:
    return {"input": _cedar_value(value) if isinstance(value, dict) else {},
            "hour": now.hour, "weekday": now.isoweekday(), "now": int(now.timestamp())}


class CedarPolicy:
    """A compiled bundle; ``decide`` is pure and fast (the policy set is parsed once)."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self.bundle = bundle
        self.snapshot_id = bundle.snapshot_id
        try:
            self._policies = cedarpy.PolicySet.from_str(bundle.source)
            parsed = json.loads(cedarpy.policies_to_json_str(bundle.source))
        except Exception as e:  # cedarpy raises plain exceptions with the parser's message
            raise PolicyError(f"policy bundle {bundle.version} does not parse: {e}") from None
        self.annotations: dict[str, dict[str, str]] = {
            pid: dict(p.get("annotations") or {}) for pid, p in (parsed.get("staticPolicies") or {}).items()
        }

    def rule_id(self, policy_id: str) -> str:
        return self.annotations.get(policy_id, {}).get("id", policy_id)

    def _request(self, request: JobRequest, action: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        job_uid = {"type": "Job", "id": request.job_hash or f"{request.workflow_id}:{request.step_id}"}
        entities = [
            {"uid": {"type": "Workflow", "id": request.workflow_id},
             "attrs": {"tenant": request.tenant, "version": request.workflow_version}, "parents": []},
            {"uid": job_uid, "attrs": {
                "topic": request.topic or "", "step": request.step_id, "step_type": request.step_type,
                "workflow": request.workflow_id, "tenant": request.tenant,
                "risk": request.labels.get("risk", ""), "labels": _cedar_value(dict(request.labels)),
                "capabilities": list(request.capabilities), "agent_version": request.agent_version,
            }, "parents": []},
        ]
        cedar_request = {"principal": {"type": "Workflow", "id": request.workflow_id},
                         "action": {"type": "Action", "id": action}, "resource": job_uid,
                         "context": _context(request.input, request.now)}
        return cedar_request, entities

    def evaluate(self, request: JobRequest, action: str) -> tuple[bool, list[str], list[str]]:
        cedar_request, entities = self._request(request, action)
        result = cedarpy.is_authorized(cedar_request, self._policies, entities)
        return bool(result.allowed), list(result.diagnostics.reasons), [str(e) for e in result.diagnostics.errors]

    def explain(self, request: JobRequest) -> list[Explanation]:
        out = []
        for action in ("dispatch", UNATTENDED):
            allowed, reasons, errors = self.evaluate(request, action)
            out.append(Explanation(action, "allow" if allowed else "deny", [self.rule_id(r) for r in reasons],
                                   errors))
        return out

    def decide(self, request: JobRequest) -> PolicyOutcome:
        allowed, reasons, errors = self.evaluate(request, "dispatch")
        if errors:
            # Cedar skips a policy that errors; for a forbid that would let the job through, so
            # a bundle that cannot be evaluated for this job fails closed
            return PolicyOutcome("deny", self.snapshot_id, [self.rule_id(r) for r in reasons] or ["evaluation-error"],
                                 reason=f"policy could not be evaluated for this job: {'; '.join(errors)[:300]}")
        if not allowed:
            rules = [self.rule_id(r) for r in reasons]
            reasons_given = [self.annotations.get(r, {}).get("reason") for r in reasons]
            reason = "; ".join(w for w in reasons_given if w) or (
                "forbidden by " + ", ".join(rules) if rules else "no policy permits this job")
            return PolicyOutcome("deny", self.snapshot_id, rules or ["default-deny"], reason=reason)
        constraints: dict[str, Any] = {}
        for pid in reasons:
            for key, value in self.annotations.get(pid, {}).items():
                if key.startswith("constraint_"):
                    constraints[key.removeprefix("constraint_")] = value
        unattended, u_reasons, u_errors = self.evaluate(request, UNATTENDED)
        rules = [self.rule_id(r) for r in reasons]
        if unattended and not request.require_approval and not u_errors:
            return PolicyOutcome("allow", self.snapshot_id, rules + [self.rule_id(r) for r in u_reasons],
                                 constraints=constraints)
        deciding = [r for r in u_reasons if self.annotations.get(r)] or u_reasons
        notes = {k: v for r in deciding for k, v in self.annotations.get(r, {}).items()}
        role = notes.get("approver_role") or request.approvers
        expires = notes.get("approval_expires_ms")
        escalate = notes.get("escalate_after_ms")
        why = notes.get("reason") or ("the workflow marks this step for approval" if request.require_approval
                                      else "policy requires a person to approve this job")
        if u_errors and not notes.get("reason"):
            why = f"policy could not decide whether this job may run unattended: {'; '.join(u_errors)[:300]}"
        return PolicyOutcome("require_approval", self.snapshot_id, rules + [self.rule_id(r) for r in u_reasons]
                             or ["require-approval"], reason=why, approver_role=role,
                             approval_expires_ms=int(expires) if expires and expires.isdigit() else None,
                             escalate_after_ms=int(escalate) if escalate and escalate.isdigit() else None,
                             escalate_to_role=notes.get("escalate_to_role"), constraints=constraints)

    def admit(self, *, tenant: str, workflow_id: str, workflow_version: str, run_input: Any,
              idempotency_key: str, requested_by: str, now: datetime) -> PolicyOutcome:
        """May this workflow start with this input? (``Action::"start"`` on ``Run::"<key>"``)."""
        run_uid = {"type": "Run", "id": idempotency_key}
        entities = [
            {"uid": {"type": "Workflow", "id": workflow_id},
             "attrs": {"tenant": tenant, "version": workflow_version}, "parents": []},
            {"uid": run_uid, "attrs": {"workflow": workflow_id, "tenant": tenant, "requested_by": requested_by},
             "parents": []},
        ]
        result = cedarpy.is_authorized({"principal": {"type": "Workflow", "id": workflow_id},
                                        "action": {"type": "Action", "id": "start"}, "resource": run_uid,
                                        "context": _context(run_input, now)}, self._policies, entities)
        rules = [self.rule_id(r) for r in result.diagnostics.reasons]
        if result.allowed:
            return PolicyOutcome("allow", self.snapshot_id, rules)
        given = [self.annotations.get(r, {}).get("reason") for r in result.diagnostics.reasons]
        reason = "; ".join(g for g in given if g) or (
            "forbidden by " + ", ".join(rules) if rules else "no policy permits starting this workflow")
        return PolicyOutcome("deny", self.snapshot_id, rules or ["default-deny"], reason=reason)


DEFAULT_BUNDLE = PolicyBundle.of("default", """\
// Interlock's default policy: every run may start and every job may run; high-risk jobs need a person.
@id("allow-start")
permit(principal, action == Action::"start", resource);

@id("allow-all")
permit(principal, action == Action::"dispatch", resource);

@id("unattended-unless-high-risk")
permit(principal, action == Action::"dispatch_unattended", resource)
unless { resource.risk == "high" };

@id("high-risk-needs-approval")
@reason("high-risk jobs need a person's approval")
forbid(principal, action == Action::"dispatch_unattended", resource)
when { resource.risk == "high" };
""")
