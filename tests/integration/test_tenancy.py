"""Tenants on the real services: a job reaches only its own tenant's workers, a run starts in the
tenant of its trigger subject (a body naming another tenant is dead-lettered), and a worker refuses
a job whose body names another tenant than its subject."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest

from interlock.contracts import headers
from interlock.contracts import subjects as s
from interlock.contracts.messages import Job, Trigger
from interlock.core.eventstore import RunNotFound
from interlock.core.ids import run_id_for
from interlock.runtime.kvkeys import matching_keys
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique

pytestmark = pytest.mark.integration


def one_step(wf: str, topic: str) -> str:
    return f"id: {wf}\nversion: 1\nsteps:\n  work: {{topic: {topic}, input: {{n: '{{{{ input.n }}}}'}}}}\n"


def recording_worker(name: str, topic: str, tenant: str, seen: list[tuple[str, str]]) -> Worker:
    worker = Worker(name, tenant=tenant)

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, Any]:
        seen.append((ctx.job.tenant, ctx.job.run_id))
        return {"by": tenant}

    return worker


async def test_a_job_reaches_only_its_own_tenants_workers(harness: Harness) -> None:
    wf, topic = unique("ten"), unique("t")
    tenant_a, tenant_b = unique("acme"), unique("globex")
    await harness.apply(one_step(wf, topic))
    in_a, in_b = dataclasses.replace(harness, tenant=tenant_a), dataclasses.replace(harness, tenant=tenant_b)
    seen_a: list[tuple[str, str]] = []
    seen_b: list[tuple[str, str]] = []
    # only tenant B serves the topic: tenant A's job waits for A's workers
    await harness.start_worker(recording_worker("b", topic, tenant_b, seen_b))
    run_a = await in_a.trigger(wf, {"n": 1})
    await in_a.wait_for(run_a, lambda evs: "StepDispatched" in types(evs))
    await harness.settled()  # every consumer, B's worker's too, has handled everything it can see
    assert seen_b == []
    assert "StepSucceeded" not in types(await in_a.events(run_a))

    run_b = await in_b.trigger(wf, {"n": 2})
    assert types(await in_b.wait_end(run_b))[-1] == "RunSucceeded"
    assert seen_b == [(tenant_b, run_b)]

    # A's worker for the same topic takes A's waiting job, and only that one
    await harness.start_worker(recording_worker("a", topic, tenant_a, seen_a))
    events = await in_a.wait_end(run_a)
    assert types(events)[-1] == "RunSucceeded"
    [succeeded] = [e for e in events if e["type"] == "StepSucceeded"]
    assert succeeded["data"]["output"] == {"by": tenant_a}
    await harness.settled()
    assert seen_a == [(tenant_a, run_a)] and seen_b == [(tenant_b, run_b)]
    # each registered under its own tenant's key
    kv = await harness.nc.jetstream().key_value(s.AGENTS_BUCKET)
    keys = await matching_keys(kv)
    for worker in harness.workers:
        assert s.agent_key(worker.tenant or "", topic, worker.worker_id) in keys


async def test_a_trigger_naming_another_tenant_is_dead_lettered(harness: Harness) -> None:
    wf, topic = unique("ten"), unique("t")
    tenant_a, tenant_b = unique("acme"), unique("globex")
    await harness.apply(one_step(wf, topic))
    js = harness.nc.jetstream()
    marker, key = uuid.uuid4().hex, uuid.uuid4().hex
    dlq_before = (await js.stream_info(s.DLQ_STREAM)).state.last_seq
    forged = Trigger(workflow_id=wf, input={"n": 1, "marker": marker}, idempotency_key=key, tenant=tenant_b)
    subject = s.trigger(tenant_a, wf)
    admin_a = (await harness.as_admin(tenant_a)).jetstream()  # may trigger tenant A's runs only
    await admin_a.publish(subject, forged.model_dump_json().encode(), headers={headers.MSG_ID: f"forged:{key}"})

    [letter] = await harness.dead_letters("planner", marker.encode(), want=1, after_seq=dlq_before)
    assert letter.subject == subject
    assert letter.reason == (f"Poison: the request names tenant {tenant_b!r} but was sent as {tenant_a!r} (subject "
                             f"{subject}): the tenant is taken from the subject, never from the body")
    await harness.settled()
    for tenant in (tenant_a, tenant_b):
        with pytest.raises(RunNotFound):
            await harness.store.load(tenant, str(run_id_for(tenant, wf, key)), fresh=True)

    # the same trigger naming the subject's own tenant (or none) starts the run there
    await harness.start_worker(recording_worker("a", topic, tenant_a, []))
    in_a = dataclasses.replace(harness, tenant=tenant_a)
    agreeing = forged.model_copy(update={"tenant": tenant_a})
    await admin_a.publish(subject, agreeing.model_dump_json().encode(), headers={headers.MSG_ID: f"ok:{key}"})
    run_id = str(run_id_for(tenant_a, wf, key))
    events = await in_a.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded"
    assert events[0]["data"]["tenant"] == tenant_a


async def test_a_worker_dead_letters_a_job_of_another_tenant_on_its_subject(harness: Harness) -> None:
    topic, tenant_a, tenant_b = unique("t"), unique("acme"), unique("globex")
    seen: list[tuple[str, str]] = []
    worker = await harness.start_worker(recording_worker("a", topic, tenant_a, seen))
    js = harness.nc.jetstream()
    run_id, marker = str(uuid.uuid4()), uuid.uuid4().hex
    job = Job(job_id=f"{run_id}:work@1", run_id=run_id, tenant=tenant_b, workflow_id="wf", step_id="work",
              topic=topic, attempt=1, idempotency_key=f"{run_id}:work", input={"marker": marker}, job_hash="0" * 64)
    dlq_before = (await js.stream_info(s.DLQ_STREAM)).state.last_seq
    dispatcher = (await harness.as_service("dispatcher")).jetstream()  # only the dispatcher publishes jobs
    await dispatcher.publish(s.job(tenant_a, topic), job.model_dump_json().encode())

    [letter] = await harness.dead_letters("worker", marker.encode(), want=1, after_seq=dlq_before)
    assert (letter.service, letter.subject) == ("worker", s.job(tenant_a, topic))
    assert letter.reason == (f"job {job.job_id} of tenant {tenant_b!r} reached worker {worker.worker_id} of tenant "
                             f"{tenant_a!r}")
    await harness.settled()
    assert seen == []
