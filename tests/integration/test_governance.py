"""Governance on the real services: Cedar bundles deny, hold and admit; approvals are bound to the
job hash and the policy snapshot; hot reload, rollback, the approver directory, escalation, the
auditor's rule lineage and ``policy simulate``.

The policy bundle and the approver directory are global to the session's nats-server: every test
that changes them restores them when it ends (see the ``bundles`` and ``approvers`` fixtures),
and every rule it publishes is scoped to its own workflow or topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from interlock.auditor.service import AuditorService
from interlock.contracts import subjects as s
from interlock.contracts.messages import QueryReply, RunQuery
from interlock.core.policy.cedar import DEFAULT_BUNDLE, CedarPolicy, PolicyBundle
from interlock.runtime.approvers import ApproverDirectory
from interlock.runtime.policy import BundleRecord, BundleStore, LivePolicy, simulate
from interlock.runtime.registry import WorkflowRegistry
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique

pytestmark = pytest.mark.integration

RELOAD_WAIT_S = 10.0


# -- helpers ---------------------------------------------------------------------------------
def of_type(events: list[dict[str, Any]], type_name: str, step: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_name and (step is None or e.get("step_id") == step)]


def data(events: list[dict[str, Any]], type_name: str, step: str | None = None) -> dict[str, Any]:
    found = of_type(events, type_name, step)
    assert len(found) == 1, f"expected one {type_name} for {step}, got {len(found)}: {types(events)}"
    return found[0]["data"]


def failures(events: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    return [(e["type"], e.get("step_id"), e["data"].get("error") or e["data"].get("reason")) for e in events]


def live_policies(harness: Harness) -> dict[str, LivePolicy]:
    """Each running service's live bundle (planner: admission; policy: decisions; approval: snapshots)."""
    found: dict[str, LivePolicy] = {}
    for i, svc in enumerate(harness.services):
        for attr in ("live", "policy"):
            value = getattr(svc, attr, None)
            if isinstance(value, LivePolicy):
                found[f"{svc.name}#{i}"] = value
    return found


async def wait_snapshot(harness: Harness, snapshot_id: str, *, names: tuple[str, ...] = ("planner", "policy",
                                                                                              "approval")) -> None:
    """Wait (bounded) until every named service's live bundle is ``snapshot_id``."""
    lives = {k: v for k, v in live_policies(harness).items() if k.split("#")[0] in names}
    assert {k.split("#")[0] for k in lives} == set(names), f"services with a live bundle: {sorted(lives)}"
    deadline = time.monotonic() + RELOAD_WAIT_S
    while True:
        current = {k: v.snapshot_id for k, v in lives.items()}
        if all(v == snapshot_id for v in current.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"services did not switch to {snapshot_id} within {RELOAD_WAIT_S}s: {current}")
        await asyncio.sleep(0.02)


class Bundles:
    """Publishes bundles for one test and waits until the services use them."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.store = BundleStore(harness.nc.jetstream())

    async def publish(self, source: str, *, version: str | None = None) -> BundleRecord:
        record = await self.store.publish(source, version=version or unique("gov"), by="test_governance")
        await wait_snapshot(self.harness, record.bundle.snapshot_id)
        return record


@pytest.fixture
async def bundles(harness: Harness) -> AsyncIterator[Bundles]:
    helper = Bundles(harness)
    previous = await helper.store.active()
    try:
        yield helper
    finally:
        restore = previous.bundle if previous is not None else DEFAULT_BUNDLE
        active = await helper.store.active()
        if active is None or active.bundle.sha256 != restore.sha256 or active.bundle.version != restore.version:
            await helper.store.publish(restore.source, version=restore.version, by="test_governance (restore)")
        with contextlib.suppress(AssertionError):
            await wait_snapshot(harness, restore.snapshot_id)


class Approvers:
    def __init__(self, directory: ApproverDirectory) -> None:
        self.directory = directory
        self.added: list[str] = []

    async def grant(self, name: str, *roles: str) -> None:
        self.added.append(name)
        await self.directory.grant(name, list(roles))


@pytest.fixture
async def approvers(harness: Harness) -> AsyncIterator[Approvers]:
    helper = Approvers(ApproverDirectory(harness.nc.jetstream()))
    was_enforcing = await helper.directory.enforcing()
    try:
        yield helper
    finally:
        for name in helper.added:
            with contextlib.suppress(Exception):
                await helper.directory.revoke(name)
    if not was_enforcing:
        assert not await helper.directory.enforcing(), "the approver directory must be empty again"


def with_rules(extra: str, base: str = DEFAULT_BUNDLE.source) -> str:
    return base + "\n// test rules\n" + extra + "\n"


def gate_rule(topic: str, rule: str, *annotations: str, role: str = "sre") -> str:
    notes = "\n".join(annotations)
    return f"""
@id("{rule}")
@reason("changes on {topic} need a person")
@approver_role("{role}")
{notes}
forbid(principal, action == Action::"dispatch_unattended", resource) when {{ resource.topic == "{topic}" }};
"""


def one_step(wf: str, topic: str) -> str:
    return f"""
id: {wf}
version: 1
steps:
  work: {{topic: {topic}, input: {{n: "{{{{ input.n }}}}"}}}}
"""


def two_steps(wf: str, topic_a: str, topic_b: str) -> str:
    return f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic_a}, input: {{n: "{{{{ input.n }}}}"}}}}
  b: {{topic: {topic_b}, depends_on: [a], input: {{n: "{{{{ steps.a.output.n }}}}"}}}}
"""


async def start_worker(harness: Harness, topic: str, calls: list[tuple[str, Any]],
                       gate: asyncio.Event | None = None, entered: asyncio.Event | None = None) -> None:
    worker = Worker(unique("gov"))

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        calls.append((ctx.job.step_id, ctx.input))
        if entered is not None:
            entered.set()
        if gate is not None:
            await asyncio.wait_for(gate.wait(), timeout=30)
        return ctx.input

    await harness.start_worker(worker)


def requested(step: str, count: int = 1) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda evs: len(of_type(evs, "ApprovalRequested", step)) >= count


async def quiet(harness: Harness, run_id: str) -> list[dict[str, Any]]:
    """The run's events once every service and worker has handled everything in flight, so
    anything that was going to follow has followed."""
    await harness.settled()
    return await harness.events(run_id)


# -- 1. deny ---------------------------------------------------------------------------------
async def test_a_forbidden_topic_denies_the_run_with_reason_and_rule_and_never_dispatches(
        harness: Harness, bundles: Bundles) -> None:
    wf, topic = unique("deny"), unique("t")
    rule = f"no-{topic}"
    await harness.apply(one_step(wf, topic))
    calls: list[tuple[str, Any]] = []
    await start_worker(harness, topic, calls)
    record = await bundles.publish(with_rules(f"""
@id("{rule}")
@reason("{topic} is switched off")
forbid(principal, action == Action::"dispatch", resource) when {{ resource.topic == "{topic}" }};
"""))
    snapshot = record.bundle.snapshot_id
    assert snapshot == f"{record.bundle.version}@{record.bundle.sha256[:12]}"

    run_id = await harness.trigger(wf, {"n": 1})
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunDenied", failures(events)
    assert data(events, "RunAdmitted")["snapshot_id"] == snapshot
    decided = data(events, "PolicyDecided", "work")
    assert decided["decision"] == "deny"
    assert decided["snapshot_id"] == snapshot
    assert decided["rule_ids"] == [rule]
    assert decided["job_hash"] == data(events, "StepReady", "work")["job_hash"]
    denied = data(events, "RunDenied")
    assert denied["step_id"] == "work"
    assert denied["reason"] == f"{topic} is switched off"
    assert denied["rule_ids"] == [rule]
    assert denied["snapshot_id"] == snapshot

    events = await quiet(harness, run_id)
    assert "StepDispatched" not in types(events), "a denied job must never be dispatched"
    assert calls == []
    assert (await harness.run_state(run_id)).steps["work"].status == "denied"


# -- 2. admission ----------------------------------------------------------------------------
async def test_a_workflow_without_a_start_permit_is_denied_in_the_commit_that_starts_it(
        harness: Harness, bundles: Bundles) -> None:
    wf, other, topic = unique("noadmit"), unique("admit"), unique("t")
    await harness.apply(one_step(wf, topic))
    await harness.apply(one_step(other, topic))
    calls: list[tuple[str, Any]] = []
    await start_worker(harness, topic, calls)
    start_permit = 'permit(principal, action == Action::"start", resource);'
    assert start_permit in DEFAULT_BUNDLE.source
    scoped = f'permit(principal, action == Action::"start", resource) unless {{ resource.workflow == "{wf}" }};'
    source = DEFAULT_BUNDLE.source.replace(start_permit, scoped)
    record = await bundles.publish(source)
    snapshot = record.bundle.snapshot_id

    run_id = await harness.trigger(wf, {"n": 1})
    await harness.wait_end(run_id)
    await harness.settled()
    commits = await harness.store.read_commits(harness.tenant, run_id)
    assert [[e["type"] for e in c.envelopes] for c in commits] == [["RunStarted", "RunDenied"]], \
        "admission is decided in the run's first commit, and nothing follows a denial"
    seq_of = {e["type"]: c.stream_seq for c in commits for e in c.envelopes}
    assert seq_of["RunStarted"] == seq_of["RunDenied"]
    denied = commits[0].envelopes[1]["data"]
    assert denied["step_id"] is None
    assert denied["rule_ids"] == ["default-deny"]
    assert denied["reason"] == "no policy permits starting this workflow"
    assert denied["snapshot_id"] == snapshot
    assert calls == []

    # the same bundle admits every other workflow, in the same way: one commit
    admitted_id = await harness.trigger(other, {"n": 2})
    events = await harness.wait_end(admitted_id)
    assert types(events)[-1] == "RunSucceeded", failures(events)
    first = (await harness.store.read_commits(harness.tenant, admitted_id))[0]
    # admitted, and its first steps planned and (issue 15) decided, in the commit that starts it
    assert [e["type"] for e in first.envelopes][:2] == ["RunStarted", "RunAdmitted"]
    assert {e["type"] for e in first.envelopes[2:]} <= {"StepReady", "StepSkipped", "StepExpanded", "PolicyDecided"}
    assert first.envelopes[1]["data"]["snapshot_id"] == snapshot
    assert first.envelopes[1]["data"]["rule_ids"] == ["allow-start"]
    assert "StepReady" not in types(await harness.events(run_id))


# -- 3. approval -----------------------------------------------------------------------------
async def test_a_job_that_needs_approval_is_held_and_released_by_the_right_person(
        harness: Harness, bundles: Bundles) -> None:
    wf, topic = unique("hold"), unique("t")
    rule = f"gate-{topic}"
    await harness.apply(one_step(wf, topic))
    calls: list[tuple[str, Any]] = []
    await start_worker(harness, topic, calls)
    record = await bundles.publish(with_rules(gate_rule(topic, rule)))
    snapshot = record.bundle.snapshot_id

    run_id = await harness.trigger(wf, {"n": 7})
    events = await harness.wait_for(run_id, requested("work"))
    job_hash = data(events, "StepReady", "work")["job_hash"]
    decided = data(events, "PolicyDecided", "work")
    assert decided["decision"] == "require_approval"
    assert decided["snapshot_id"] == snapshot
    assert rule in decided["rule_ids"]
    assert decided["approver_role"] == "sre"
    assert decided["reason"] == f"changes on {topic} need a person"
    request = data(events, "ApprovalRequested", "work")
    assert request["job_hash"] == job_hash
    assert request["snapshot_id"] == snapshot
    assert request["approver_role"] == "sre"

    events = await quiet(harness, run_id)
    assert "StepDispatched" not in types(events), "a held job must not reach a worker"
    assert calls == []

    reply = await harness.decide(run_id, "work", job_hash=job_hash, role="sre", approver="dana",
                                 reason="CHG-1234 reviewed")
    assert reply.ok, reply.error
    events = await harness.wait_end(run_id)
    await harness.settled()
    assert types(events)[-1] == "RunSucceeded", failures(events)
    granted = data(events, "ApprovalGranted", "work")
    assert (granted["approver"], granted["role"], granted["reason"]) == ("dana", "sre", "CHG-1234 reviewed")
    assert granted["job_hash"] == job_hash
    seq = types(events, "work")
    assert seq.index("PolicyDecided") < seq.index("ApprovalRequested") < seq.index("ApprovalGranted") \
        < seq.index("StepDispatched") < seq.index("StepSucceeded")
    assert seq.count("StepDispatched") == 1
    assert calls == [("work", {"n": 7})]


# -- 4. expiry -------------------------------------------------------------------------------
async def test_an_approval_request_expires_fails_the_step_and_refuses_late_grants(
        harness: Harness, bundles: Bundles) -> None:
    wf, topic = unique("expire"), unique("t")
    await harness.apply(one_step(wf, topic))
    calls: list[tuple[str, Any]] = []
    await start_worker(harness, topic, calls)
    await bundles.publish(with_rules(gate_rule(topic, f"gate-{topic}", '@approval_expires_ms("500")')))

    run_id = await harness.trigger(wf, {"n": 1})
    events = await harness.wait_for(run_id, requested("work"))
    assert data(events, "PolicyDecided", "work")["approval_expires_ms"] == 500
    request = of_type(events, "ApprovalRequested", "work")[0]
    assert request["data"]["expires_at"] is not None

    events = await harness.wait_end(run_id, timeout=15)
    assert types(events)[-1] == "RunFailed", failures(events)
    expired = data(events, "ApprovalExpired", "work")
    assert expired["job_hash"] == request["data"]["job_hash"]
    failed = data(events, "StepFailed", "work")
    assert failed["final"] is True and failed["error"]["kind"] == "approval_expired"
    seq = types(events)
    assert seq.index("ApprovalExpired") < seq.index("StepFailed") < seq.index("RunFailed")

    late = await harness.decide(run_id, "work", role="sre", approver="dana")
    assert not late.ok, "a grant after expiry must be refused"
    events = await quiet(harness, run_id)
    assert not {"ApprovalGranted", "StepDispatched"} & set(types(events))
    assert calls == []


# -- 5. forged hash --------------------------------------------------------------------------
async def test_a_decision_for_a_forged_or_another_jobs_hash_releases_nothing(
        harness: Harness, bundles: Bundles) -> None:
    wf, topic = unique("forge"), unique("t")
    await harness.apply(one_step(wf, topic))
    calls: list[tuple[str, Any]] = []
    await start_worker(harness, topic, calls)
    await bundles.publish(with_rules(gate_rule(topic, f"gate-{topic}")))

    run_a = await harness.trigger(wf, {"n": 1})
    run_b = await harness.trigger(wf, {"n": 2})
    hash_a = data(await harness.wait_for(run_a, requested("work")), "ApprovalRequested", "work")["job_hash"]
    hash_b = data(await harness.wait_for(run_b, requested("work")), "ApprovalRequested", "work")["job_hash"]
    assert hash_a != hash_b

    for forged in ("0" * 64, hash_b, hash_a[:-1] + ("0" if hash_a[-1] != "0" else "1")):
        reply = await harness.decide(run_a, "work", job_hash=forged, role="sre", approver="mallory")
        assert not reply.ok, f"grant with hash {forged[:12]} must be refused"
        assert "job hash" in (reply.error or ""), reply.error
    rejected = await harness.decide(run_a, "work", grant=False, job_hash=hash_b, role="sre", approver="mallory")
    assert not rejected.ok and "job hash" in (rejected.error or "")

    events = await quiet(harness, run_a)
    assert not {"ApprovalGranted", "ApprovalRejected", "StepDispatched"} & set(types(events)), types(events)
    # each refused decision is on the record, naming who tried and for which hash
    refused = of_type(events, "ApprovalRefused", "work")
    assert [(r["data"]["principal"], r["data"]["decision"]) for r in refused] == \
        [("mallory", "approve")] * 3 + [("mallory", "reject")]
    assert [r["data"]["job_hash"] for r in refused] == ["0" * 64, hash_b, refused[2]["data"]["job_hash"], hash_b]
    state = await harness.run_state(run_a)
    assert state.steps["work"].status == "awaiting_approval"
    assert state.steps["work"].approval is not None and state.steps["work"].approval.status == "requested"
    assert "ApprovalGranted" not in types(await harness.events(run_b))
    assert calls == []

    # the right hashes release exactly their own jobs
    for run_id, job_hash in ((run_a, hash_a), (run_b, hash_b)):
        reply = await harness.decide(run_id, "work", job_hash=job_hash, role="sre", approver="dana")
        assert reply.ok, reply.error
        events = await harness.wait_end(run_id)
        assert types(events)[-1] == "RunSucceeded", failures(events)
    assert sorted(calls, key=str) == sorted([("work", {"n": 1}), ("work", {"n": 2})], key=str)


# -- 6. policy change while an approval waits ------------------------------------------------
async def test_a_policy_change_invalidates_a_waiting_approval_and_asks_again(
        harness: Harness, bundles: Bundles) -> None:
    wf, topic = unique("change"), unique("t")
    rule = f"gate-{topic}"
    await harness.apply(one_step(wf, topic))
    calls: list[tuple[str, Any]] = []
    await start_worker(harness, topic, calls)
    v1 = await bundles.publish(with_rules(gate_rule(topic, rule)))
    run_id = await harness.trigger(wf, {"n": 3})
    events = await harness.wait_for(run_id, requested("work"))
    first = data(events, "ApprovalRequested", "work")
    assert first["snapshot_id"] == v1.bundle.snapshot_id

    approval = next(svc for svc in harness.services if svc.name == "approval")
    v2 = await bundles.publish(with_rules(gate_rule(topic, rule) + f"""
@id("{wf}-revised") @reason("revised after review")
forbid(principal, action == Action::"dispatch", resource) when {{ resource.topic == "{topic}.never" }};
"""))
    assert v2.bundle.snapshot_id != v1.bundle.snapshot_id
    assert approval.live.snapshot_id == v2.bundle.snapshot_id  # type: ignore[attr-defined]

    reply = await harness.decide(run_id, "work", role="sre", approver="dana", reason="looks fine")
    assert not reply.ok, "an approval given for rules no longer in force must not release the job"
    error = reply.error or ""
    assert "policy changed" in error, error
    assert v1.bundle.snapshot_id in error and v2.bundle.snapshot_id in error, error

    events = await harness.wait_for(run_id, requested("work", 2))
    invalidated = data(events, "ApprovalInvalidated", "work")
    assert invalidated["job_hash"] == first["job_hash"]
    assert invalidated["snapshot_id"] == v2.bundle.snapshot_id
    decisions = of_type(events, "PolicyDecided", "work")
    assert [d["data"]["snapshot_id"] for d in decisions] == [v1.bundle.snapshot_id, v2.bundle.snapshot_id]
    assert decisions[1]["data"]["decision"] == "require_approval"
    assert rule in decisions[1]["data"]["rule_ids"]
    again = of_type(events, "ApprovalRequested", "work")[1]["data"]
    assert again["snapshot_id"] == v2.bundle.snapshot_id
    assert again["job_hash"] == first["job_hash"]
    seq = types(events, "work")
    assert seq == ["StepReady", "PolicyDecided", "ApprovalRequested", "ApprovalInvalidated", "PolicyDecided",
                   "ApprovalRequested"], seq
    assert calls == []

    reply = await harness.decide(run_id, "work", role="sre", approver="dana", reason="re-checked under v2")
    assert reply.ok, reply.error
    events = await harness.wait_end(run_id)
    await harness.settled()
    assert types(events)[-1] == "RunSucceeded", failures(events)
    assert data(events, "ApprovalGranted", "work")["reason"] == "re-checked under v2"
    assert types(events, "work").count("StepDispatched") == 1
    assert calls == [("work", {"n": 3})]


# -- 7. hot reload mid-run, then rollback ----------------------------------------------------
async def test_a_new_bundle_applies_to_the_next_step_of_a_running_run_and_rollback_restores_the_old_one(
        harness: Harness, bundles: Bundles) -> None:
    wf, topic_a, topic_b = unique("reload"), unique("ta"), unique("tb")
    deny_b = f"{wf}-deny-b"
    await harness.apply(two_steps(wf, topic_a, topic_b))
    calls_a: list[tuple[str, Any]] = []
    calls_b: list[tuple[str, Any]] = []
    gate, entered = asyncio.Event(), asyncio.Event()
    await start_worker(harness, topic_a, calls_a, gate=gate, entered=entered)
    await start_worker(harness, topic_b, calls_b)
    services_before = list(harness.services)

    v1_source = with_rules(f"""
@id("{wf}-marker")
permit(principal, action == Action::"dispatch", resource) when {{ resource.workflow == "{wf}" }};
""")
    v1 = await bundles.publish(v1_source)
    run_id = await harness.trigger(wf, {"n": 1})
    await asyncio.wait_for(entered.wait(), timeout=20)
    events = await harness.events(run_id)
    assert data(events, "PolicyDecided", "a")["snapshot_id"] == v1.bundle.snapshot_id
    assert "b" not in {e.get("step_id") for e in events}, "b must not be ready while a runs"

    v2 = await bundles.publish(v1_source + f"""
@id("{deny_b}") @reason("{topic_b} was switched off mid-run")
forbid(principal, action == Action::"dispatch", resource) when {{ resource.topic == "{topic_b}" }};
""")
    gate.set()
    events = await harness.wait_end(run_id)
    await harness.settled()
    assert types(events)[-1] == "RunDenied", failures(events)
    assert data(events, "StepSucceeded", "a")
    decided_b = data(events, "PolicyDecided", "b")
    assert decided_b["decision"] == "deny"
    assert decided_b["snapshot_id"] == v2.bundle.snapshot_id
    assert decided_b["rule_ids"] == [deny_b]
    denied = data(events, "RunDenied")
    assert (denied["step_id"], denied["snapshot_id"], denied["rule_ids"]) == ("b", v2.bundle.snapshot_id, [deny_b])
    assert "StepDispatched" not in types(events, "b")
    assert calls_a == [("a", {"n": 1})] and calls_b == []
    assert harness.services == services_before, "no service was restarted"

    rolled = await bundles.store.rollback(by="test_governance")
    assert (rolled.bundle.version, rolled.bundle.sha256) == (v1.bundle.version, v1.bundle.sha256)
    active = await bundles.store.active()
    assert active is not None and active.bundle.snapshot_id == v1.bundle.snapshot_id
    assert [r.bundle.snapshot_id for r in (await bundles.store.history())[-3:]] == [
        v1.bundle.snapshot_id, v2.bundle.snapshot_id, v1.bundle.snapshot_id]
    await wait_snapshot(harness, v1.bundle.snapshot_id)

    again = await harness.trigger(wf, {"n": 2})
    events = await harness.wait_end(again)
    await harness.settled()
    assert types(events)[-1] == "RunSucceeded", failures(events)
    assert data(events, "PolicyDecided", "b")["snapshot_id"] == v1.bundle.snapshot_id
    assert calls_b == [("b", {"n": 2})]


# -- 8. approver directory -------------------------------------------------------------------
async def test_only_registered_approvers_in_roles_they_hold_may_decide(
        harness: Harness, bundles: Bundles, approvers: Approvers) -> None:
    wf, topic = unique("dir"), unique("t")
    erin, mallory = unique("erin"), unique("mallory")
    await harness.apply(one_step(wf, topic))
    calls: list[tuple[str, Any]] = []
    await start_worker(harness, topic, calls)
    await bundles.publish(with_rules(gate_rule(topic, f"gate-{topic}")))
    await approvers.grant(erin, "sre")
    assert await approvers.directory.enforcing()

    run_id = await harness.trigger(wf, {"n": 1})
    await harness.wait_for(run_id, requested("work"))

    kept = "the request stays pending (the refusal is recorded in the run's log)"
    stranger = await harness.decide(run_id, "work", role="sre", approver=mallory)
    assert not stranger.ok
    assert stranger.error == (f"{mallory!r} may not approve step 'work' of run {run_id}: {mallory!r} lacks role "
                              f"'sre' (is not a registered approver); {kept}")
    stranger_reject = await harness.decide(run_id, "work", grant=False, role="sre", approver=mallory)
    assert not stranger_reject.ok
    assert (stranger_reject.error or "").startswith(f"{mallory!r} may not reject step 'work' of run {run_id}: ")
    other_role = await harness.decide(run_id, "work", role="finance", approver=erin)
    assert not other_role.ok
    assert other_role.error == (f"{erin!r} may not approve step 'work' of run {run_id}: {erin!r} decided as role "
                                f"'finance'; the request needs role 'sre'; {kept}")
    # the approver is the subject's principal: a body naming a registered approver does not make
    # mallory one, and erin cannot be recorded as someone else either
    subject = s.command(harness.tenant, "approve", mallory)
    posing = await harness.decide(run_id, "work", role="sre", approver=mallory, body={"approver": erin})
    assert not posing.ok and posing.error == (
        f"the request names approver {erin!r} but was sent as {mallory!r} (subject {subject}): the approver is "
        f"taken from the subject, never from the body")
    masked = await harness.decide(run_id, "work", role="sre", approver=erin, body={"approver": "someone-else"})
    assert not masked.ok and "names approver 'someone-else' but was sent as" in (masked.error or "")

    events = await quiet(harness, run_id)
    assert not {"ApprovalGranted", "ApprovalRejected", "StepDispatched"} & set(types(events))
    # refused by role: on the record, the request untouched; refused by body: before any state was read
    refused = [e["data"] for e in of_type(events, "ApprovalRefused", "work")]
    assert [(r["principal"], r["role"], r["required_role"], r["decision"]) for r in refused] == [
        (mallory, "sre", "sre", "approve"), (mallory, "sre", "sre", "reject"), (erin, "finance", "sre", "approve")]
    state = await harness.run_state(run_id)
    assert state.steps["work"].approval is not None and state.steps["work"].approval.status == "requested"
    assert calls == []

    reply = await harness.decide(run_id, "work", role="sre", approver=erin, reason="on call")
    assert reply.ok, reply.error
    events = await harness.wait_end(run_id)
    await harness.settled()
    assert types(events)[-1] == "RunSucceeded", failures(events)
    granted = data(events, "ApprovalGranted", "work")
    assert (granted["approver"], granted["role"]) == (erin, "sre")
    assert calls == [("work", {"n": 1})]


# -- 9. escalation ---------------------------------------------------------------------------
async def test_an_unanswered_request_escalates_to_another_role(harness: Harness, bundles: Bundles) -> None:
    wf, topic = unique("esc"), unique("t")
    await harness.apply(one_step(wf, topic))
    calls: list[tuple[str, Any]] = []
    await start_worker(harness, topic, calls)
    await bundles.publish(with_rules(gate_rule(topic, f"gate-{topic}", '@escalate_after_ms("300")',
                                               '@escalate_to_role("sre-lead")')))

    run_id = await harness.trigger(wf, {"n": 1})
    events = await harness.wait_for(run_id, requested("work"))
    request = data(events, "ApprovalRequested", "work")
    assert request["approver_role"] == "sre"
    assert request["escalate_to_role"] == "sre-lead" and request["escalate_at"] is not None

    events = await harness.wait_for(run_id, lambda evs: bool(of_type(evs, "ApprovalEscalated", "work")), timeout=15)
    escalated = data(events, "ApprovalEscalated", "work")
    assert (escalated["from_role"], escalated["to_role"]) == ("sre", "sre-lead")
    assert escalated["job_hash"] == request["job_hash"]

    too_junior = await harness.decide(run_id, "work", role="sre", approver="dana")
    assert not too_junior.ok
    assert "the request needs role 'sre-lead'" in (too_junior.error or ""), too_junior.error
    assert "ApprovalGranted" not in types(await harness.events(run_id))

    reply = await harness.decide(run_id, "work", role="sre-lead", approver="lee", reason="escalated, approved")
    assert reply.ok, reply.error
    events = await harness.wait_end(run_id)
    await harness.settled()
    assert types(events)[-1] == "RunSucceeded", failures(events)
    granted = data(events, "ApprovalGranted", "work")
    assert (granted["approver"], granted["role"]) == ("lee", "sre-lead")
    seq = types(events, "work")
    assert seq.index("ApprovalRequested") < seq.index("ApprovalEscalated") < seq.index("ApprovalGranted")
    assert calls == [("work", {"n": 1})]


# -- 10. rule lineage in the auditor's timeline ----------------------------------------------
async def test_the_timeline_shows_snapshot_rules_and_the_matching_approval(
        harness: Harness, bundles: Bundles, tmp_path: Path) -> None:
    wf, topic = unique("lineage"), unique("t")
    rule = f"gate-{topic}"
    await harness.apply(one_step(wf, topic))
    calls: list[tuple[str, Any]] = []
    await start_worker(harness, topic, calls)
    record = await bundles.publish(with_rules(gate_rule(topic, rule)))
    snapshot = record.bundle.snapshot_id

    auditor = AuditorService(harness.service_settings("auditor", sweep_interval=15.0),
                             db_path=str(tmp_path / "a.sqlite3"), instance=unique("gov"))
    await auditor.start()
    try:
        run_id = await harness.trigger(wf, {"n": 5})
        events = await harness.wait_for(run_id, requested("work"))
        job_hash = data(events, "ApprovalRequested", "work")["job_hash"]
        reply = await harness.decide(run_id, "work", role="sre", approver="frank", reason="reviewed")
        assert reply.ok, reply.error
        events = await harness.wait_end(run_id)
        assert types(events)[-1] == "RunSucceeded", failures(events)

        deadline = time.monotonic() + RELOAD_WAIT_S
        timeline: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            msg = await harness.nc.request(s.query(harness.tenant, "timeline"),
                                           RunQuery(run_id=run_id).model_dump_json().encode(), timeout=5)
            answer = QueryReply.model_validate_json(msg.data)
            if answer.ok and len(answer.result) == len(events):
                timeline = answer.result
                break
            await asyncio.sleep(0.1)
        assert [t["type"] for t in timeline] == types(events), "the auditor did not project the whole run"

        def entry(type_name: str) -> dict[str, Any]:
            found = [t for t in timeline if t["type"] == type_name and t["step_id"] in ("work", None)]
            assert len(found) == 1, (type_name, timeline)
            return found[0]

        admitted = entry("RunAdmitted")
        assert admitted["details"]["snapshot_id"] == snapshot and snapshot in admitted["summary"]
        policy = entry("PolicyDecided")
        assert policy["step_id"] == "work"
        assert policy["details"]["decision"] == "require_approval"
        assert policy["details"]["snapshot_id"] == snapshot
        assert rule in policy["details"]["rule_ids"]
        assert policy["details"]["job_hash"] == job_hash
        assert snapshot in policy["summary"] and rule in policy["summary"]
        asked = entry("ApprovalRequested")
        assert asked["details"]["job_hash"] == job_hash
        assert asked["details"]["snapshot_id"] == snapshot
        assert asked["details"]["approver_role"] == "sre"
        assert job_hash[:6] in asked["summary"]
        granted = entry("ApprovalGranted")
        assert granted["details"]["job_hash"] == job_hash
        assert (granted["details"]["approver"], granted["details"]["role"]) == ("frank", "sre")
        assert "frank" in granted["summary"]
        assert entry("StepReady")["details"]["job_hash"] == job_hash
        order = [t["type"] for t in timeline]
        assert order.index("PolicyDecided") < order.index("ApprovalRequested") < order.index("ApprovalGranted") \
            < order.index("StepDispatched")
    finally:
        await auditor.stop()
        with contextlib.suppress(Exception):
            await harness.nc.jetstream().delete_consumer(s.EVENTS_STREAM, auditor.durable("events"))


# -- 11. simulate ----------------------------------------------------------------------------
async def test_simulate_lists_the_recent_jobs_a_draft_would_deny(harness: Harness) -> None:
    wf, topic_a, topic_b = unique("sim"), unique("ta"), unique("tb")
    draft_rule = f"draft-deny-{topic_a}"
    await harness.apply(two_steps(wf, topic_a, topic_b))
    calls: list[tuple[str, Any]] = []
    await start_worker(harness, topic_a, calls)
    await start_worker(harness, topic_b, calls)
    run_ids = []
    for n in range(3):
        run_id = await harness.trigger(wf, {"n": n})
        events = await harness.wait_end(run_id)
        assert types(events)[-1] == "RunSucceeded", failures(events)
        assert all(d["data"]["decision"] == "allow" for d in of_type(events, "PolicyDecided"))
        run_ids.append(run_id)

    workflow = await WorkflowRegistry(harness.nc.jetstream()).get(wf)
    workflows = {(workflow.id, workflow.version): workflow}
    draft = CedarPolicy(PolicyBundle.of("draft", with_rules(f"""
@id("{draft_rule}") @reason("{topic_a} would be switched off")
forbid(principal, action == Action::"dispatch", resource) when {{ resource.topic == "{topic_a}" }};
""")))
    checked, changes = await simulate(harness.nc, draft, workflows, limit=200)
    assert checked >= 6
    assert sorted((c.decision.run_id, c.decision.step_id) for c in changes) == sorted((r, "a") for r in run_ids)
    for change in changes:
        assert (change.decision.decision, change.new_decision) == ("allow", "deny")
        assert change.new_rules == [draft_rule]
        assert change.reason == f"{topic_a} would be switched off"
        assert change.decision.topic == topic_a

    unchanged = CedarPolicy(PolicyBundle.of("same", DEFAULT_BUNDLE.source))
    _, none = await simulate(harness.nc, unchanged, workflows, limit=200)
    assert none == [], "a draft that decides as the active bundle changes nothing"



async def test_the_escalation_timer_of_an_invalidated_request_does_not_escalate_its_replacement(
        harness: Harness, bundles: Bundles) -> None:
    wf, topic = unique("escinv"), unique("t")
    await harness.apply(one_step(wf, topic))
    calls: list[tuple[str, Any]] = []
    await start_worker(harness, topic, calls)
    gate = gate_rule(topic, f"gate-{topic}", '@escalate_after_ms("1500")', '@escalate_to_role("sre-lead")')
    await bundles.publish(with_rules(gate))
    run_id = await harness.trigger(wf, {"n": 1})
    await harness.wait_for(run_id, requested("work"))
    await asyncio.sleep(0.5)  # a clock gap on purpose: the replacement request must escalate later
    await bundles.publish(with_rules(gate + "\n// revised\n"))
    reply = await harness.decide(run_id, "work", role="sre", approver="dana")
    assert not reply.ok and "policy changed" in (reply.error or ""), reply.error
    events = await harness.wait_for(run_id, requested("work", 2))
    first, second = (e["data"] for e in of_type(events, "ApprovalRequested", "work"))
    assert datetime.fromisoformat(second["escalate_at"]) > datetime.fromisoformat(first["escalate_at"])

    events = await harness.wait_for(run_id, lambda evs: bool(of_type(evs, "ApprovalEscalated", "work")), timeout=15)
    escalated_at = datetime.fromisoformat(of_type(events, "ApprovalEscalated", "work")[0]["at"])
    # the first request's timer fired while the second waited: it must not have escalated the second early
    assert escalated_at >= datetime.fromisoformat(second["escalate_at"]) - timedelta(milliseconds=50), \
        f"escalated at {escalated_at}, the request escalates at {second['escalate_at']}"
    events = await quiet(harness, run_id)
    assert len(of_type(events, "ApprovalEscalated", "work")) == 1

    reply = await harness.decide(run_id, "work", role="sre-lead", approver="lee")
    assert reply.ok, reply.error
    events = await harness.wait_end(run_id)
    await harness.settled()
    assert types(events)[-1] == "RunSucceeded", failures(events)
    assert calls == [("work", {"n": 1})]
