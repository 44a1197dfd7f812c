"""The principal-by-action matrix (issue 10), on the session's nats-server with auth and the real
services: each cell asserts that the forbidden action is refused — with an error naming the
principal, the action and the missing permission where the product gives one — that nothing was
written by the refused attempt, and that the allowed action of the right principal works.

| cell                         | refused                                   | allowed                          |
| ---------------------------- | ----------------------------------------- | -------------------------------- |
| anonymous-connect            | a connection without a credential         | a viewer connects                |
| worker-pulls-other-tenant    | tenant A's worker pulls B's job           | B's worker runs it               |
| worker-appends-run-log       | a worker appends to a run log             | a service appends                |
| worker-approves              | a worker decides an approval              | the approver                     |
| viewer-cancels               | a viewer cancels                          | the operator                     |
| approver-other-tenant        | A's approver decides B's run              | B's approver                     |
| approver-without-role        | an approver lacking the step's role       | one holding it                   |
| policy-publish-{role}        | a non-admin publishes a policy bundle     | policy-admin                     |
| stream-{action}-{principal}  | update / shrink / delete of IL_EVENTS     | admin updates a scratch stream   |
| read-other-tenant-{what}     | runs, timeline, events, notifications     | the tenant's own viewer          |
| person-reads-run-log         | a read while every own consumer is in use | watch, load, approve by a person |
| revoke-worker                | a revoked worker, connected and reconnect | another worker keeps working     |

A denied core publish or subscribe shows only through the connection's error callback
(:class:`~tests.integration.harness.Watched`); a denied request or JetStream call as a timeout,
kept short here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.js.api import ConsumerConfig, StreamConfig

from interlock.auditor.service import AuditorService
from interlock.client import Client, ClientError, NotFound, Refused
from interlock.contracts import catalog as c
from interlock.contracts import headers
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.contracts.messages import ApprovalDecision, CancelRequest
from interlock.core.eventstore import EventStore, RunNotFound
from interlock.core.policy.cedar import DEFAULT_BUNDLE
from interlock.identity import PermissionDenied, creds_permissions, describe_permission_error, permission_violation
from interlock.runtime.approvers import ApproverDirectory
from interlock.runtime.connect import ConnectRefused, connect
from interlock.runtime.policy import BundleStore
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, Watched, types, unique, watched
from tests.integration.test_approvals import gated, requested
from tests.integration.test_eventstore import started
from tests.integration.test_tenancy import one_step, recording_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DENIED_TIMEOUT = 1.0
"""How long a call the server drops (a request or JetStream call it may not publish) is waited for."""
TIMEOUTS = (TimeoutError, nats.errors.TimeoutError)


@dataclasses.dataclass
class Matrix:
    """The harness, and connections as the cell's principals (closed at the end of the test)."""

    harness: Harness
    stack: contextlib.AsyncExitStack

    @property
    def url(self) -> str:
        return self.harness.url

    def creds(self, role: str, tenant: str, name: str | None = None, topics: tuple[str, ...] = ()) -> Path:
        principals = self.harness.principals
        assert principals is not None
        path = principals.home.issue(role, tenant, topics or None, name=name or unique(role))
        principals.publish_keyring()  # as `interlock creds issue` does: its signatures are trusted at once
        return path

    async def client(self, role: str, tenant: str, name: str | None = None) -> Client:
        """The Interlock client (what the CLI uses) as a new ``role`` principal of ``tenant``."""
        client = await Client.connect(self.url, creds=self.creds(role, tenant, name), tenant=tenant)
        self.stack.push_async_callback(client.close)
        return client

    async def watched(self, creds: Path) -> Watched:
        session = await watched(self.url, creds)
        self.stack.push_async_callback(session.nc.close)
        return session

    def tenant(self, tenant: str) -> Harness:
        return dataclasses.replace(self.harness, tenant=tenant)


@pytest.fixture
async def matrix(harness: Harness) -> AsyncIterator[Matrix]:
    async with contextlib.AsyncExitStack() as stack:
        yield Matrix(harness, stack)


async def assert_violation(session: Watched, verb: str, subject: str, *, principal: str, action: str) -> str:
    """The server reported that ``session`` may not ``verb`` ``subject``; the product's message for it."""
    violation = await session.violation()
    assert permission_violation(violation) == (verb, subject.lower())
    message = describe_permission_error(violation, principal=principal, action=action, subject=subject)
    assert message == f"{principal} may not {action}: the credential lacks permission to {verb} to {subject!r}"
    return message


async def assert_request_dropped(session: Watched, subject: str, body: bytes, *, principal: str,
                                 action: str) -> None:
    """A request the server drops: a timeout for the caller, a violation on its connection."""
    with pytest.raises(TIMEOUTS) as timed_out:
        await session.nc.request(subject, body, timeout=DENIED_TIMEOUT)
    message = describe_permission_error(timed_out.value, principal=principal, action=action, subject=subject)
    assert message is not None and f"missing permission to publish to {subject!r}" in message
    await assert_violation(session, "publish", subject, principal=principal, action=action)


def refused_at_once(principal: str, action: str, subject: str) -> str:
    """The client's (and the CLI's) error for an action the credential may not publish."""
    return rf"^{principal} \(.+\.creds\) may not {action}: the credential lacks permission to publish to '{subject}'$"


async def pending_approval(m: Matrix, tenant: str) -> tuple[Harness, str, list[tuple[str, Any]]]:
    """A run of ``tenant`` waiting for the ``finance`` approval of its step ``gate``."""
    wf, topic = unique("mx"), unique("t")
    h = m.tenant(tenant)
    await h.apply(gated(wf, topic))
    calls: list[tuple[str, Any]] = []
    worker = Worker("mx", tenant=tenant)

    @worker.job(topic)
    async def handle(ctx: JobContext) -> Any:
        calls.append((ctx.job.step_id, ctx.input))
        return ctx.input

    await h.start_worker(worker)
    run_id = await h.trigger(wf, {"amount": 7})
    await h.wait_for(run_id, requested("gate"))
    return h, run_id, calls


async def approve(client: Client, h: Harness, run_id: str) -> bool:
    """``client``'s grant of the run's pending ``gate`` (role and job hash given: the refusal
    cells test the decision, not the look-up of what is pending)."""
    approval = (await h.run_state(run_id)).steps["gate"].approval
    assert approval is not None
    return (await client.approve(run_id, "gate", role=approval.approver_role, job_hash=approval.job_hash)).ok


async def assert_still_pending(h: Harness, run_id: str, before: list[dict[str, Any]]) -> None:
    """Nothing half-done: after the barrier the run's log is what it was, the approval still asked."""
    await h.settled()
    assert await h.events(run_id) == before
    approval = (await h.run_state(run_id)).steps["gate"].approval
    assert approval is not None and approval.status == "requested"


# -- connecting ------------------------------------------------------------------------------
async def test_anonymous_connect(matrix: Matrix) -> None:
    with pytest.raises(ConnectRefused, match=rf"^an anonymous connection \(no creds given\) may not connect to "
                                             rf"{matrix.url}: the server refused the connection's credentials"):
        await connect(matrix.url, patient=False)
    viewer = await matrix.client("viewer", "default")
    assert (await viewer.js.stream_info(s.EVENTS_STREAM)).config.name == s.EVENTS_STREAM


# -- workers ---------------------------------------------------------------------------------
async def test_worker_pulls_other_tenant(matrix: Matrix) -> None:
    wf, topic, tenant_a, tenant_b = unique("mx"), unique("t"), unique("acme"), unique("globex")
    in_b = matrix.tenant(tenant_b)
    await in_b.apply(one_step(wf, topic))
    run_b = await in_b.trigger(wf, {"n": 1})
    await in_b.wait_for(run_b, lambda evs: "StepDispatched" in types(evs))

    name = unique("worker-a")
    creds_a = matrix.creds("worker", tenant_a, name, (topic,))
    # the SDK refuses at once, naming the topic and the permission
    sdk_worker = recording_worker("a", topic, tenant_b, [])
    sdk_worker.nats_url, sdk_worker.creds = matrix.url, creds_a
    with pytest.raises(PermissionDenied, match=rf"^worker a \({creds_a}\) may not pull tenant {tenant_b}'s jobs of "
                                               rf"topic '{topic}': the credential lacks permission to publish"):
        await sdk_worker.start()
    # and the server: A's credential may not create (or read) B's durable consumer
    session = await matrix.watched(creds_a)
    durable = s.worker_consumer(tenant_b, topic)
    with pytest.raises(TIMEOUTS):
        await session.nc.jetstream(timeout=DENIED_TIMEOUT).pull_subscribe(s.job(tenant_b, topic), durable=durable,
                                                                          stream=s.JOBS_STREAM)
    violation = await session.violation()
    verb, denied = permission_violation(violation) or ("", "")
    assert verb == "publish" and denied.startswith("$js.api.consumer.") and durable.lower() in denied

    # nothing taken: B's own worker gets the job, exactly once
    seen: list[tuple[str, str]] = []
    await in_b.start_worker(recording_worker("b", topic, tenant_b, seen))
    assert types(await in_b.wait_end(run_b))[-1] == "RunSucceeded"
    await in_b.settled()
    assert seen == [(tenant_b, run_b)]


async def test_worker_appends_run_log(matrix: Matrix) -> None:
    h = matrix.harness
    wf, topic = unique("mx"), unique("t")
    await h.apply(one_step(wf, topic))
    await h.start_worker(recording_worker("w", topic, h.tenant, []))
    run_id = await h.trigger(wf, {"n": 1})
    await h.wait_end(run_id)
    await h.settled()
    before = await h.events(run_id)

    name = unique("worker")
    session = await matrix.watched(matrix.creds("worker", h.tenant, name, (topic,)))
    subject = s.commit_subject(h.tenant, run_id, "planner", "flow")
    forged = b'{"type": "RunSucceeded", "forged": true}'
    await session.nc.publish(subject, forged)  # core publish: refused through error_cb only
    await assert_violation(session, "publish", subject, principal=name, action="append to a run log")
    with pytest.raises(TIMEOUTS):  # JetStream publish: no ack
        await session.nc.jetstream(timeout=DENIED_TIMEOUT).publish(subject, forged,
                                                                   headers={headers.MSG_ID: uuid.uuid4().hex})
    await assert_violation(session, "publish", subject, principal=name, action="append to a run log")
    await h.settled()
    assert await h.events(run_id) == before

    # a service (the planner's credential) appends
    other_tenant, fresh = unique("acme"), uuid.uuid4()
    assert h.writer is not None
    store = EventStore(h.writer, h.writer.jetstream(), service="test")
    with pytest.raises(RunNotFound):
        await store.load(other_tenant, str(fresh), fresh=True)
    await store.start_run(fresh, started(other_tenant))
    assert len(await store.read_commits(other_tenant, str(fresh))) == 1


async def test_worker_approves(matrix: Matrix) -> None:
    h, run_id, calls = await pending_approval(matrix, "default")
    before = await h.events(run_id)
    approval = (await h.run_state(run_id)).steps["gate"].approval
    assert approval is not None
    decision = ApprovalDecision(run_id=run_id, step_id="gate", job_hash=approval.job_hash, role="finance")
    name = unique("worker")
    creds = matrix.creds("worker", h.tenant, name, ("mx.any",))
    subject = s.command(h.tenant, "approve", name)
    # through the client (and so the CLI): refused at once, naming principal, action and permission
    client = await Client.connect(matrix.url, creds=creds, tenant=h.tenant)
    matrix.stack.push_async_callback(client.close)
    with pytest.raises(Refused, match=refused_at_once(name, f"approve in tenant {h.tenant}", subject)):
        await client.approve(run_id, "gate", role="finance", job_hash=approval.job_hash)
    # on the server: dropped
    session = await matrix.watched(creds)
    await assert_request_dropped(session, subject, decision.model_dump_json().encode(), principal=name,
                                 action="approve")
    await assert_still_pending(h, run_id, before)

    approver = await matrix.client("approver", h.tenant)
    assert await approve(approver, h, run_id)
    assert types(await h.wait_end(run_id))[-1] == "RunSucceeded"
    assert [step for step, _ in calls] == ["prepare", "pay"]


async def test_viewer_cancels(matrix: Matrix) -> None:
    h, run_id, _ = await pending_approval(matrix, "default")
    before = await h.events(run_id)
    viewer = await matrix.client("viewer", h.tenant)
    subject = s.command(h.tenant, "cancel", viewer.principal)
    with pytest.raises(Refused, match=refused_at_once(viewer.principal, f"cancel in tenant {h.tenant}", subject)):
        await viewer.cancel(run_id, reason="not mine to cancel")
    assert viewer.creds is not None
    session = await matrix.watched(viewer.creds)
    await assert_request_dropped(session, subject, CancelRequest(run_id=run_id).model_dump_json().encode(),
                                 principal=viewer.principal, action="cancel")
    await assert_still_pending(h, run_id, before)

    operator = await matrix.client("operator", h.tenant)
    assert (await operator.cancel(run_id, reason="operator says stop")).ok
    events = await h.wait_end(run_id)
    assert types(events)[-1] == "RunCancelled"


# -- approvals -------------------------------------------------------------------------------
async def test_approver_other_tenant(matrix: Matrix) -> None:
    tenant_a, tenant_b = unique("acme"), unique("globex")
    in_b, run_b, _ = await pending_approval(matrix, tenant_b)
    before = await in_b.events(run_b)
    approval = (await in_b.run_state(run_b)).steps["gate"].approval
    assert approval is not None
    approver_a = await matrix.client("approver", tenant_a)
    subject = s.command(tenant_b, "approve", approver_a.principal)
    with pytest.raises(Refused, match=refused_at_once(approver_a.principal, f"approve in tenant {tenant_b}", subject)):
        await approver_a.with_tenant(tenant_b).approve(run_b, "gate", role="finance", job_hash=approval.job_hash)
    decision = ApprovalDecision(run_id=run_b, step_id="gate", job_hash=approval.job_hash, role="finance")
    assert approver_a.creds is not None
    session = await matrix.watched(approver_a.creds)
    await assert_request_dropped(session, subject, decision.model_dump_json().encode(),
                                 principal=approver_a.principal, action="approve")
    # sent as tenant A (what the credential may send), B's run is not found there
    with pytest.raises(Refused, match=rf"^refused: .*{run_b}"):
        await approver_a.approve(run_b, "gate", role="finance", job_hash=approval.job_hash)
    await assert_still_pending(in_b, run_b, before)

    approver_b = await matrix.client("approver", tenant_b)
    assert await approve(approver_b, in_b, run_b)
    assert types(await in_b.wait_end(run_b))[-1] == "RunSucceeded"


async def test_approver_without_role(matrix: Matrix) -> None:
    h, run_id, _ = await pending_approval(matrix, "default")
    directory = ApproverDirectory(h.nc.jetstream())  # the admin's connection: only admin writes it
    lacking, holding = unique("sre-only"), unique("finance")
    try:
        await directory.grant(lacking, ["sre"])
        await directory.grant(holding, ["finance"])
        before = await h.events(run_id)
        client = await matrix.client("approver", h.tenant, name=lacking)
        with pytest.raises(Refused, match=rf"^refused: '{lacking}' may not approve step 'gate' of run {run_id}: "
                                          rf"'{lacking}' lacks role 'finance'"):
            await approve(client, h, run_id)
        await h.settled()
        events = await h.events(run_id)
        [refused] = [e for e in events[len(before):] if e["type"] == "ApprovalRefused"]
        assert (refused["data"]["principal"], refused["data"]["required_role"]) == (lacking, "finance")
        assert types(events[len(before):]) == ["ApprovalRefused"]  # on the record, nothing else changed
        await assert_still_pending(h, run_id, events)

        # a non-admin may not write the approver directory
        viewer = await matrix.client("viewer", h.tenant)
        kv_subject = p.kv_key(s.APPROVERS_BUCKET, lacking)
        assert viewer.creds is not None
        session = await matrix.watched(viewer.creds)
        with pytest.raises(TIMEOUTS):
            await session.nc.jetstream(timeout=DENIED_TIMEOUT).publish(kv_subject, b'["finance"]')
        await assert_violation(session, "publish", kv_subject, principal=viewer.principal,
                               action="write the approver directory")
        assert await directory.roles(lacking) == {"sre"}

        approver = await matrix.client("approver", h.tenant, name=holding)
        assert await approve(approver, h, run_id)
        events = await h.wait_end(run_id)
        assert types(events)[-1] == "RunSucceeded"
        assert [e["data"]["approver"] for e in events if e["type"] == "ApprovalGranted"] == [holding]
    finally:
        for name in (lacking, holding):
            with contextlib.suppress(Exception):
                await directory.revoke(name)


# -- policy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["viewer", "operator", "approver"], ids=lambda r: f"policy-publish-{r}")
async def test_non_admin_policy_publish(matrix: Matrix, role: str) -> None:
    store = BundleStore(matrix.harness.nc.jetstream())
    active = await store.active()
    restore = active.bundle if active is not None else DEFAULT_BUNDLE
    forbid_all = "forbid(principal, action, resource);\n"
    client = await matrix.client(role, "default")
    subject = p.kv_key(s.POLICIES_BUCKET, "active")
    with pytest.raises(Refused, match=refused_at_once(client.principal, "publish a policy bundle",
                                                      subject.replace("$", r"\$"))):
        await client.policy_publish(forbid_all, version=unique("forbid"), by=client.principal)
    with pytest.raises(Refused, match=refused_at_once(client.principal, "roll back the policy",
                                                      subject.replace("$", r"\$"))):
        await client.policy_rollback(by=client.principal)
    assert client.creds is not None
    session = await matrix.watched(client.creds)
    with pytest.raises(TIMEOUTS):
        await session.nc.jetstream(timeout=DENIED_TIMEOUT).publish(subject, forbid_all.encode())
    await assert_violation(session, "publish", subject, principal=client.principal, action="publish a policy bundle")
    after = await store.active()
    assert (after.revision if after else None) == (active.revision if active else None)

    admin = await matrix.client("policy-admin", "default")
    version = unique("same")
    try:
        published = await admin.policy_publish(restore.source, version=version, by=admin.principal)
        assert (published.version, published.published_by) == (version, admin.principal)
    finally:
        await store.publish(restore.source, version=restore.version, by="test_permission_matrix (restore)")


# -- streams ---------------------------------------------------------------------------------
STREAM_ACTIONS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "update": lambda js: js.update_stream(StreamConfig(name=s.EVENTS_STREAM, subjects=[s.EVENTS_ALL],
                                                       description="changed by a non-admin")),
    "shrink": lambda js: js.update_stream(StreamConfig(name=s.EVENTS_STREAM, subjects=[s.EVENTS_ALL], max_msgs=1)),
    "delete": lambda js: js.delete_stream(s.EVENTS_STREAM),
}


@pytest.mark.parametrize("principal", ["operator", "policy-admin", c.PLANNER])
@pytest.mark.parametrize("action", list(STREAM_ACTIONS), ids=lambda a: f"stream-{a}")
async def test_non_admin_stream_change(matrix: Matrix, action: str, principal: str) -> None:
    admin_js = matrix.harness.nc.jetstream()
    before = await admin_js.stream_info(s.EVENTS_STREAM)
    name = unique(principal)
    creds = (matrix.harness.principals.home.issue(principal, None, name=name)  # type: ignore[union-attr]
             if principal == c.PLANNER else matrix.creds(principal, "default", name))
    session = await matrix.watched(creds)
    with pytest.raises(TIMEOUTS):
        await STREAM_ACTIONS[action](session.nc.jetstream(timeout=DENIED_TIMEOUT))
    verb = "DELETE" if action == "delete" else "UPDATE"
    await assert_violation(session, "publish", p.js_stream(verb, s.EVENTS_STREAM), principal=name,
                           action=f"{action} stream {s.EVENTS_STREAM}")
    after = await admin_js.stream_info(s.EVENTS_STREAM)
    assert after.config == before.config and after.state.messages >= before.state.messages

    # admin's change of a scratch stream (never the session's IL_EVENTS) works
    scratch = unique("MXSCRATCH").replace("-", "_")
    await admin_js.add_stream(StreamConfig(name=scratch, subjects=[f"{scratch.lower()}.>"]))
    try:
        updated = await admin_js.update_stream(StreamConfig(name=scratch, subjects=[f"{scratch.lower()}.>"],
                                                            max_msgs=1))
        assert updated.config.max_msgs == 1
    finally:
        assert await admin_js.delete_stream(scratch)


# -- reading another tenant ------------------------------------------------------------------
@pytest.fixture
async def finished_in_b(matrix: Matrix, auditor: AuditorService) -> tuple[Harness, str, str]:
    """A run of a new tenant B that succeeded (and the auditor projected); (B's harness, run id, tenant A)."""
    wf, topic, tenant_a, tenant_b = unique("mx"), unique("t"), unique("acme"), unique("globex")
    in_b = matrix.tenant(tenant_b)
    await in_b.apply(one_step(wf, topic) + "  tell: {type: notify, depends_on: [work], channel: mx, message: done}\n")
    await in_b.start_worker(recording_worker("b", topic, tenant_b, []))
    run_b = await in_b.trigger(wf, {"n": 1})
    assert types(await in_b.wait_end(run_b))[-1] == "RunSucceeded"
    return in_b, run_b, tenant_a


async def read_runs(client: Client, run_id: str) -> Any:
    return [r for r in await client.runs(limit=500) if r.get("run_id") == run_id]


async def read_timeline(client: Client, run_id: str) -> Any:
    return await client.timeline(run_id)


READS: dict[str, Callable[[Client, str], Awaitable[Any]]] = {"runs": read_runs, "timeline": read_timeline}


@pytest.mark.parametrize("what", list(READS), ids=lambda w: f"read-other-tenant-{w}")
async def test_read_other_tenant(matrix: Matrix, finished_in_b: tuple[Harness, str, str], what: str) -> None:
    in_b, run_b, tenant_a = finished_in_b
    read = READS[what]
    viewer_b = await matrix.client("viewer", in_b.tenant)
    await viewer_b.wait_projected(run_b)
    own = await read(viewer_b, run_b)
    assert own, f"B's viewer reads B's {what}"

    viewer_a = await matrix.client("viewer", tenant_a)
    # asked as tenant B: refused (the client at once; the server would drop it)
    with pytest.raises((Refused, *TIMEOUTS, nats.errors.Error)) as refused:
        await asyncio.wait_for(read(viewer_a.with_tenant(in_b.tenant), run_b), 3 * DENIED_TIMEOUT)
    if isinstance(refused.value, Refused):
        assert str(refused.value).startswith(f"{viewer_a.principal} (")
        assert "lacks permission to publish" in str(refused.value)
    # asked as its own tenant: B's run is not there
    try:
        mine = await read(viewer_a, run_b)
    except (NotFound, RunNotFound):
        mine = []
    assert not mine


@pytest.mark.parametrize("other", [False, True], ids=["read-own-tenant-events", "read-other-tenant-events"])
async def test_read_other_tenant_events(matrix: Matrix, finished_in_b: tuple[Harness, str, str], other: bool) -> None:
    """A person reads run logs only through consumers of their own (pinned names), which the
    server holds to the tenant's run subjects."""
    in_b, run_b, tenant_a = finished_in_b
    name = unique("viewer")
    creds = matrix.creds("viewer", tenant_a if other else in_b.tenant, name)
    session = await matrix.watched(creds)
    assert matrix.harness.principals is not None
    mine = p.principal_consumer(matrix.harness.principals.home.principal(name).public_key, 0)
    js = session.nc.jetstream(timeout=DENIED_TIMEOUT)
    config = ConsumerConfig(name=mine, filter_subject=s.run_log(in_b.tenant, run_b), inactive_threshold=30)
    if other:
        with pytest.raises(TIMEOUTS):
            await js.add_consumer(s.EVENTS_STREAM, config)
        violation = await session.violation()
        verb, denied = permission_violation(violation) or ("", "")
        assert verb == "publish" and denied.startswith("$js.api.consumer.create.")
        with pytest.raises(TIMEOUTS):  # nor a direct get of the run's messages
            await js.get_last_msg(s.EVENTS_STREAM, s.run_log(in_b.tenant, run_b), direct=True)
        verb, denied = permission_violation(await session.violation()) or ("", "")
        assert verb == "publish" and denied.startswith(s.js_direct_get(s.EVENTS_STREAM).lower())
        return
    await js.add_consumer(s.EVENTS_STREAM, config)
    sub = await js.pull_subscribe_bind(mine, s.EVENTS_STREAM)
    msgs = await sub.fetch(1, timeout=2)
    assert msgs and s.log_of(msgs[0].subject) == s.run_events(in_b.tenant, run_b)
    first = json.loads(msgs[0].data)
    assert run_b in json.dumps(first)


async def test_read_other_tenant_notifications(matrix: Matrix, finished_in_b: tuple[Harness, str, str]) -> None:
    in_b, run_b, tenant_a = finished_in_b
    subject = p.pattern(s.notify, in_b.tenant, p.ANY)
    name = unique("viewer-a")
    session = await matrix.watched(matrix.creds("viewer", tenant_a, name))
    await session.nc.subscribe(subject)
    await assert_violation(session, "subscribe", subject, principal=name, action="read tenant notifications")
    with pytest.raises(TIMEOUTS):  # nor through a JetStream consumer on the notification stream
        await session.nc.jetstream(timeout=DENIED_TIMEOUT).subscribe(subject, stream=s.NOTIFY_STREAM,
                                                                     ordered_consumer=True)
    # B's viewer reads B's notifications, through a consumer of its own
    name_b = unique("viewer-b")
    viewer_b = await matrix.watched(matrix.creds("viewer", in_b.tenant, name_b))
    assert matrix.harness.principals is not None
    mine = p.principal_consumer(matrix.harness.principals.home.principal(name_b).public_key, 0)
    js = viewer_b.nc.jetstream(timeout=2.0)
    await js.add_consumer(s.NOTIFY_STREAM, ConsumerConfig(name=mine, filter_subject=subject, inactive_threshold=30))
    sub = await js.pull_subscribe_bind(mine, s.NOTIFY_STREAM)
    [msg] = await sub.fetch(1, timeout=2)
    assert msg.subject == s.notify(in_b.tenant, "mx") and run_b in msg.data.decode()


async def test_a_person_loads_a_run_through_the_client(matrix: Matrix) -> None:
    """A person's credential may not direct-get the run logs (a batch get cannot be held to a
    tenant): the client reads them through the principal's own consumers, one per concurrent
    read, deletes each after it, and says so clearly when every one is in use."""
    h, run_id, _ = await pending_approval(matrix, "default")
    viewer = await matrix.client("viewer", h.tenant)
    approver = await matrix.client("approver", h.tenant)
    assert not creds_permissions(viewer.creds).allows_publish(s.js_direct_get(s.EVENTS_STREAM))  # type: ignore[arg-type]

    run = await asyncio.wait_for(viewer.load_run(run_id), 5)
    approval = run.steps["gate"].approval
    assert approval is not None and approval.status == "requested" and approval.approver_role == "finance"
    assert await asyncio.wait_for(viewer.events(run_id), 5) == await h.events(run_id)

    # every slot held by a watch: another read is refused at once, naming why
    seen: list[list[dict[str, Any]]] = [[] for _ in range(p.PRINCIPAL_CONSUMER_SLOTS)]
    started_watching = [asyncio.Event() for _ in seen]

    async def watch(i: int) -> None:
        async for envelope in viewer.watch(run_id, timeout=30):
            seen[i].append(envelope)
            started_watching[i].set()

    watches = [asyncio.create_task(watch(i)) for i in range(len(seen))]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started_watching)), 10)
    with pytest.raises(ClientError, match=rf"^{viewer.principal} \(.+\.creds\) cannot read a run's log now: all "
                                          rf"{p.PRINCIPAL_CONSUMER_SLOTS} consumers this credential may read "
                                          rf"{s.EVENTS_STREAM} through \(.+\) are in use"):
        await viewer.load_run(run_id)

    # the approver's slots are its own: it finds the pending approval and decides it without
    # being told the role or the job hash
    assert (await asyncio.wait_for(approver.pending_approval(run_id, "gate"), 5)).job_hash == approval.job_hash
    assert (await asyncio.wait_for(approver.approve(run_id, "gate"), 5)).ok
    await asyncio.wait_for(asyncio.gather(*watches), 20)
    final = await viewer.events(run_id)  # the watches gave their slots back
    assert types(final)[-1] == "RunSucceeded"
    assert seen == [[e for e in final if e["type"] != "StepHeartbeat"]] * len(seen)
    assert (await viewer.load_run(run_id)).status == "succeeded"


# -- revocation ------------------------------------------------------------------------------
async def test_revoke_worker(matrix: Matrix) -> None:
    h = matrix.harness
    assert h.principals is not None
    home = h.principals.home
    wf, topic = unique("mx"), unique("t")
    await h.apply(one_step(wf, topic))
    doomed_name, keeper_name = unique("doomed"), unique("keeper")
    doomed_creds = matrix.creds("worker", h.tenant, doomed_name, (topic,))
    doomed = await matrix.watched(doomed_creds)
    await doomed.nc.jetstream(timeout=2.0).publish(s.heartbeat(h.tenant, "run-x"), b"{}")  # works before
    seen: list[tuple[str, str]] = []
    keeper = recording_worker("keeper", topic, h.tenant, seen)
    keeper.creds = matrix.creds("worker", h.tenant, keeper_name, (topic,))
    await h.start_worker(keeper)

    home.revoke(doomed_name)
    await home.push(h.url)
    await asyncio.wait_for(doomed.closed.wait(), 5)  # cut off by the running server, no restart
    message = describe_permission_error(doomed.nc.last_error or Exception(), principal=doomed_name, action="pull jobs")
    assert message == f"{doomed_name} may not pull jobs: the credential was revoked"
    with pytest.raises(ConnectRefused, match=rf"may not connect to {h.url}: "):
        await connect(h.url, creds=doomed_creds, patient=False)

    run_id = await h.trigger(wf, {"n": 1})
    assert types(await h.wait_end(run_id))[-1] == "RunSucceeded"
    assert seen == [(h.tenant, run_id)]
    assert [u.revoked_at is not None for u in home.list() if u.name in (doomed_name, keeper_name)] == [True, False]
