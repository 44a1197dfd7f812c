"""A worker's consumer of the jobs meant for its own agent version (canary rollouts, version
ranges): one of ``subjects.VERSION_SLOTS`` durable consumers per tenant and topic, whose filter
subject fixes the version (``il.vjob.{tenant}.{version}.{topic}``).

A slot is taken with the JetStream API's ``create`` action, which never changes a consumer that
exists with another filter: two versions racing for one slot cannot both get it (the loser tries
the next). A slot nobody pulls from is freed by the server (``inactive_threshold``).
"""

from __future__ import annotations

import json
import logging

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from interlock.contracts import permissions as p
from interlock.contracts import protocol
from interlock.contracts import subjects as s

log = logging.getLogger("interlock.worker")

CONSUMER_EXISTS = 10148  # JSConsumerAlreadyExists: the name is taken with another configuration


def slot_config(durable: str, subject: str) -> ConsumerConfig:
    settings = protocol.WORKER_CONSUMER
    return ConsumerConfig(name=durable, durable_name=durable, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
                          ack_wait=settings.ack_wait_s, max_ack_pending=settings.max_ack_pending,
                          deliver_policy=DeliverPolicy.ALL, max_deliver=settings.max_deliver,
                          inactive_threshold=protocol.VERSION_SLOT_IDLE_S)


async def claim_slot(nc: NATS, js: JetStreamContext, tenant: str, topic: str, version: str) -> str | None:
    """The durable consumer of ``version``'s jobs of the topic (taking a free slot if none has its
    filter yet); None when every slot serves another version."""
    subject = s.versioned_job(tenant, version, topic)
    for slot in range(s.VERSION_SLOTS):
        durable = s.worker_version_consumer(tenant, topic, slot)
        body = {"stream_name": s.JOBS_STREAM, "config": slot_config(durable, subject).as_dict(), "action": "create"}
        reply = await nc.request(p.js_filtered_consumer_create(s.JOBS_STREAM, subject, durable),
                                 json.dumps(body).encode(), timeout=5)
        answer = json.loads(reply.data or b"{}")
        error = answer.get("error")
        if not error:
            return durable
        if error.get("err_code") != CONSUMER_EXISTS:
            raise RuntimeError(f"creating consumer {durable}: {error.get('description', error)}")
        info = await js.consumer_info(s.JOBS_STREAM, durable)
        if info.config.filter_subject == subject:
            return durable  # this version's slot, created with other settings by an older worker
    log.warning("every one of the %d version slots of topic %s (tenant %s) serves another version: "
                "jobs routed to version %s will wait", s.VERSION_SLOTS, topic, tenant, version)
    return None
