"""The Python worker SDK does what contracts/ says a worker does: its topic consumer has the
documented settings, its registry entries are there while it runs and gone after a clean stop."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError

from interlock.contracts import protocol
from interlock.contracts import subjects as s
from interlock.core.codec import canonical_json
from interlock.runtime.connect import connect
from interlock.runtime.payloads import PayloadStore
from interlock.worker import JobContext, Worker
from tests.principals import Principals

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_worker_consumer_and_registry_follow_the_contract(provisioned: str, principals: Principals,
                                                                 nc: NATS) -> None:
    topic = f"contract.t{uuid.uuid4().hex[:8]}"
    worker = Worker("contract", nats_url=provisioned, tenant="default", creds=principals.worker([topic]))

    @worker.job(topic)
    async def handle(ctx: JobContext) -> None:
        return None

    await worker.start()
    js = nc.jetstream()
    kv = await js.key_value(s.AGENTS_BUCKET)
    key = s.agent_key("default", topic, worker.worker_id)
    try:
        info = await js.consumer_info(s.JOBS_STREAM, s.worker_consumer("default", topic))
        expected = protocol.WORKER_CONSUMER
        cfg = info.config
        assert (str(getattr(cfg.ack_policy, "value", cfg.ack_policy)), cfg.ack_wait, cfg.max_ack_pending,
                cfg.max_deliver, str(getattr(cfg.deliver_policy, "value", cfg.deliver_policy))) == (
            expected.ack_policy, expected.ack_wait_s, expected.max_ack_pending, expected.max_deliver,
            expected.deliver_policy)
        assert cfg.filter_subject == s.job("default", topic)
        assert (await kv.get(key)).value
    finally:
        await worker.stop()
    with pytest.raises(KeyNotFoundError):  # KeyDeletedError is one
        await kv.get(key)


async def test_a_payload_offloaded_twice_needs_no_purge(provisioned: str, principals: Principals) -> None:
    """A step input equal to the run input (``input: "{{ input }}"``) is the same content-addressed
    object: storing it again must not make the client purge old chunks, which a service may not."""
    nc = await connect(provisioned, creds=principals.service("planner"), patient=False)
    try:
        store = PayloadStore(nc.jetstream(), inline_limit=1024)
        value = {"blob": uuid.uuid4().hex * 300}
        _, first = await store.offload(value)
        _, again = await asyncio.wait_for(store.offload(value), 10)
        await asyncio.wait_for(store.store_all({first.key: canonical_json(value)} if first else {}), 10)
        assert first is not None and first == again
        assert await store.resolve(None, again) == value
    finally:
        await nc.close()
