"""Policy bundles and the approver directory, as the client's plain results."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from interlock.client._errors import Refused
from interlock.client._types import PolicyChange, PolicyDecision, PolicyRevision, PolicyRuleMatch, PolicySimulation
from interlock.core.policy import DEFAULT_BUNDLE, CedarPolicy, PolicyBundle, PolicyError, request_for
from interlock.core.workflow import Workflow
from interlock.runtime.approvers import ApproverDirectory
from interlock.runtime.policy import BundleRecord, BundleStore, simulate


def _revision(record: BundleRecord) -> PolicyRevision:
    b = record.bundle
    return PolicyRevision(revision=record.revision, snapshot_id=b.snapshot_id, version=b.version, source=b.source,
                          published_at=record.published_at, published_by=record.published_by)


async def publish(js: JetStreamContext, source: str, *, version: str | None, by: str) -> PolicyRevision:
    """Compile ``source`` and make it the active bundle."""
    try:
        return _revision(await BundleStore(js).publish(source, version=version, by=by))
    except (PolicyError, ValueError) as e:
        raise Refused(f"policy not published: {e}") from None


async def rollback(js: JetStreamContext, *, to: str | None, by: str) -> PolicyRevision:
    """Make the previous bundle (or version ``to``) active again."""
    try:
        return _revision(await BundleStore(js).rollback(to_version=to, by=by))
    except (PolicyError, ValueError) as e:
        raise Refused(f"policy not rolled back: {e}") from None


async def _active_bundle(js: JetStreamContext) -> tuple[BundleRecord | None, PolicyBundle]:
    record = await BundleStore(js).active()
    return record, record.bundle if record else DEFAULT_BUNDLE


async def active(js: JetStreamContext) -> PolicyRevision:
    """The active bundle, or the built-in default (``builtin=True``) when nothing was published."""
    record, bundle = await _active_bundle(js)
    if record is not None:
        return _revision(record)
    return PolicyRevision(revision=0, snapshot_id=bundle.snapshot_id, version=bundle.version, source=bundle.source,
                          builtin=True)


async def history(js: JetStreamContext) -> list[PolicyRevision]:
    """Every published bundle, oldest first."""
    return [_revision(r) for r in await BundleStore(js).history()]


async def decide(js: JetStreamContext, workflow: Workflow, step_id: str, job_input: Any, *, tenant: str,
                 explain: bool) -> PolicyDecision:
    """The active policy's decision for one job of ``workflow`` (and which rules matched)."""
    _, bundle = await _active_bundle(js)
    try:
        engine = CedarPolicy(bundle)
        request = request_for(workflow, step_id, tenant=tenant, job_input=job_input)
        outcome = engine.decide(request)
        matches = [PolicyRuleMatch(x.action, x.decision, list(x.matched), list(x.errors))
                   for x in engine.explain(request)] if explain else []
    except (PolicyError, ValueError) as e:
        raise Refused(f"policy evaluation failed: {e}") from None
    return PolicyDecision(decision=str(outcome.decision), snapshot_id=outcome.snapshot_id,
                          rule_ids=list(outcome.rule_ids), reason=outcome.reason,
                          approver_role=outcome.approver_role, approval_expires_ms=outcome.approval_expires_ms,
                          constraints=dict(outcome.constraints), explain=matches)


async def simulate_draft(nc: NATS, draft_source: str, workflows: dict[tuple[str, str], Workflow], *,
                         limit: int) -> PolicySimulation:
    """Re-decide recent jobs with a draft bundle."""
    try:
        draft = CedarPolicy(PolicyBundle.of("draft", draft_source))
    except (PolicyError, ValueError) as e:
        raise Refused(f"draft policy: {e}") from None
    checked, changes = await simulate(nc, draft, workflows, limit)
    return PolicySimulation(checked, [PolicyChange(c.decision.run_id, c.decision.step_id, c.decision.decision,
                                                   c.new_decision, list(c.new_rules), c.reason) for c in changes])


async def approvers(js: JetStreamContext) -> dict[str, list[str]]:
    """Every registered approver and the roles they hold."""
    return await ApproverDirectory(js).list()


async def grant(js: JetStreamContext, name: str, roles: list[str]) -> set[str]:
    """Give ``name`` ``roles``; return the roles they now hold."""
    return await ApproverDirectory(js).grant(name, roles)


async def revoke(js: JetStreamContext, name: str, roles: list[str] | None) -> set[str]:
    """Take ``roles`` (all, when None or empty) from ``name``; return what is left."""
    return await ApproverDirectory(js).revoke(name, roles or None)
