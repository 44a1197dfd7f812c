"""Dead letters: what a service could not process, kept with the reason and the original bytes."""

from __future__ import annotations

import base64
import hashlib
import logging
from datetime import UTC, datetime

from nats.js import JetStreamContext
from pydantic import ValidationError

from interlock.contracts import protocol
from interlock.contracts import subjects as s
from interlock.contracts.messages import DeadLetter
from interlock.runtime.publish import publish

log = logging.getLogger(__name__)

# A larger original keeps only this prefix (plus its size and hash): base64 of a whole ~4 MiB
# message exceeds the stream's max message size, and a dead letter that cannot be stored would
# leave the original redelivered without end.
DATA_PREFIX_LIMIT = protocol.DEAD_LETTER_PREFIX_LIMIT
HEADERS_LIMIT = protocol.DEAD_LETTER_HEADERS_LIMIT


def letter_for(service: str, subject: str, data: bytes, reason: str,
               headers: dict[str, str] | None = None) -> DeadLetter:
    """The dead letter of ``data``: whole if small, else a bounded prefix with its size and hash."""
    truncated = len(data) > DATA_PREFIX_LIMIT
    kept = dict(headers or {})
    if sum(len(k) + len(v) for k, v in kept.items()) > HEADERS_LIMIT:
        kept = {k: v[:256] for k, v in list(kept.items())[:32]}
    return DeadLetter(service=service, subject=subject, reason=reason[:protocol.DEAD_LETTER_REASON_LIMIT],
                      data_b64=base64.b64encode(data[:DATA_PREFIX_LIMIT]).decode(), headers=kept,
                      at=datetime.now(UTC), size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                      truncated=truncated)


async def dead_letter(js: JetStreamContext, service: str, subject: str, data: bytes, reason: str,
                      headers: dict[str, str] | None = None) -> None:
    letter = letter_for(service, subject, data, reason, headers)
    log.warning("%s: dead-lettered a message from %s (%d bytes): %s", service, subject, len(data), reason[:300])
    await publish(js, s.dead_letter(service), letter.model_dump_json().encode())


def read_letter(subject: str, data: bytes, seq: int | None, at: datetime | None = None) -> DeadLetter:
    """The dead letter stored as ``data``, or, for anything else found on a dead-letter subject
    (a foreign message; the stream denies purge, so it stays), an entry saying it is unreadable,
    with its stream sequence, size and hash: one stray message never hides the others."""
    try:
        return DeadLetter.model_validate_json(data)
    except ValidationError as e:
        problem = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(body)'}: {err['msg']}" for err in e.errors()[:2])
        return letter_for(subject.rsplit(".", 1)[-1], subject, data,
                          f"unreadable dead letter (stream seq {seq}, {len(data)} bytes): {problem}") \
            .model_copy(update={"at": at or datetime.now(UTC)})
