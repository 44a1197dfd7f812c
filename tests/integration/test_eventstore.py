from __future__ import annotations

import uuid

import pytest

from interlock.contracts import events as ev
from interlock.core.eventstore import EventStore, RunExists
from interlock.core.run import Run

pytestmark = pytest.mark.integration


@pytest.fixture
def nc(service_nc):  # only services append to run logs
    return service_nc


def started(tenant: str = "acme", key: str | None = None) -> ev.RunStarted:
    return ev.RunStarted(workflow_id="wf", workflow_version="1", definition_hash="h" * 64,
                         idempotency_key=key or uuid.uuid4().hex, tenant=tenant, input={"x": 1})


async def test_start_load_append(nc):
    store = EventStore(nc, nc.jetstream(), service="test")
    rid = uuid.uuid4()
    await store.start_run(rid, started())
    def ready(run: Run) -> None:
        run.mark_step_ready(ev.StepReady(step_id="a", topic="t", job_hash="j"))
    handle, envs = await store.update("acme", str(rid), ready)
    assert [e["type"] for e in envs] == ["StepReady"]
    other = EventStore(nc, nc.jetstream(), service="other")
    loaded = await other.load("acme", str(rid))
    assert loaded.version == 2 and loaded.run.steps["a"].status == "ready"
    assert loaded.last_hash == handle.last_hash
    with pytest.raises(RunExists):
        await other.start_run(rid, started())
