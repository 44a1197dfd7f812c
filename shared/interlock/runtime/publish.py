"""JetStream publishes that ride through a stream-leader election or a reconnect.

Every publish that matters carries a ``Nats-Msg-Id``, so trying again after a lost ack is safe:
JetStream's duplicate window drops the second copy.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

log = logging.getLogger(__name__)

TRANSIENT = (nats.errors.TimeoutError, NoStreamResponseError, ServiceUnavailableError, nats.errors.NoRespondersError,
             nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError)


DUPLICATE_IN_PROCESS = 10158  # a retry raced the first copy inside the cluster: try again


async def publish(js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str] | None = None, *,
                  patience: float = 30.0, timeout: float = 5.0) -> PubAck:
    deadline = time.monotonic() + patience
    delay = 0.05
    while True:
        try:
            return await js.publish(subject, payload, headers=headers, timeout=timeout)
        except (*TRANSIENT, APIError) as e:
            if isinstance(e, APIError) and not isinstance(e, TRANSIENT) and e.err_code != DUPLICATE_IN_PROCESS:
                raise
            if time.monotonic() > deadline:
                raise
            log.warning("publish to %s not acknowledged (%r); retrying", subject, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
