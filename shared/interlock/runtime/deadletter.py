"""Dead letters: what a service could not process, kept with the reason and the original bytes."""

from __future__ import annotations

import base64
import logging
from datetime import UTC, datetime

from nats.js import JetStreamContext

from interlock.contracts import subjects as s
from interlock.contracts.messages import DeadLetter
from interlock.runtime.publish import publish

log = logging.getLogger(__name__)


async def dead_letter(js: JetStreamContext, service: str, subject: str, data: bytes, reason: str,
                      headers: dict[str, str] | None = None) -> None:
    letter = DeadLetter(service=service, subject=subject, reason=reason[:2000],
                        data_b64=base64.b64encode(data).decode(), headers=dict(headers or {}),
                        at=datetime.now(UTC))
    log.warning("%s: dead-lettered a message from %s: %s", service, subject, reason[:300])
    await publish(js, s.dead_letter(service), letter.model_dump_json().encode())
