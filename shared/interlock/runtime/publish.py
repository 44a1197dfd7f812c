"""JetStream publishes that ride through a stream-leader election or a reconnect.

Every publish that matters carries a message id (``headers.MSG_ID``), so trying again after a
lost ack is safe: JetStream's duplicate window drops the second copy.
"""

from __future__ import annotations

import functools
import logging

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from interlock.contracts import headers as h
from interlock.core.eventstore import DUPLICATE_IN_PROCESS
from interlock.core.retry import Backoff, retrying
from interlock.runtime import tracing

log = logging.getLogger(__name__)

TRANSIENT = (nats.errors.TimeoutError, NoStreamResponseError, ServiceUnavailableError, nats.errors.NoRespondersError,
             nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError)
PUBLISH_BACKOFF = Backoff(first=0.05, cap=1.0)


def _passing(error: BaseException) -> bool:
    """No ack yet (election, reconnect), or a retry raced the first copy inside the cluster."""
    return isinstance(error, TRANSIENT) or (isinstance(error, APIError) and error.err_code == DUPLICATE_IN_PROCESS)


async def publish(js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str] | None = None, *,
                  patience: float = 30.0, timeout: float = 5.0) -> PubAck:
    """``js.publish``, tried again on a passing failure for up to ``patience`` seconds.

    The message carries the current span's ``traceparent`` unless ``headers`` set one."""
    headers = dict(headers or {})
    if not headers.get(h.TRACEPARENT):
        headers.pop(h.TRACEPARENT, None)
        tracing.inject(headers)
    call = functools.partial(js.publish, subject, payload, headers=headers or None, timeout=timeout)
    ack = await retrying(call, what=f"publish to {subject}", backoff=PUBLISH_BACKOFF, passing=_passing,
                         patience=patience, logger=log)
    tracing.acted(tracing.PUBLISHED, subject=subject)
    return ack
