"""Dead letters: what a service could not process, kept with the reason and the original bytes."""

from __future__ import annotations

import base64
import hashlib
import logging
from datetime import UTC, datetime

from nats.js import JetStreamContext
from pydantic import ValidationError

from interlock.contracts import catalog as c
from interlock.contracts import headers as h
from interlock.contracts import protocol
from interlock.contracts import subjects as s
from interlock.contracts.messages import DeadLetter, DeadLetterAction, DeadLetterStatus
from interlock.identity import subject_matches
from interlock.runtime import metrics
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
    metrics.dead_letters.add(1, {"service": service, "kind": _subject_kind(subject)})


def _subject_kind(subject: str) -> str:
    """The second token of an Interlock subject (evt, job, result, …): a bounded metric label."""
    parts = subject.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == s.PREFIX else "other"


def read_letter(subject: str, data: bytes, seq: int | None, at: datetime | None = None) -> DeadLetter:
    """The dead letter stored as ``data``, or, for anything else found on a dead-letter subject
    (a foreign message; the stream denies purge, so it stays), an entry saying it is unreadable,
    with its stream sequence, size and hash: one stray message never hides the others."""
    return read_entry(subject, data, seq, at)[0]


def read_entry(subject: str, data: bytes, seq: int | None, at: datetime | None = None) -> tuple[DeadLetter, bool]:
    """(:func:`read_letter`, whether ``data`` was a dead letter at all). Never raises."""
    try:
        return DeadLetter.model_validate_json(data), True
    except (ValidationError, ValueError) as e:
        errors = e.errors()[:2] if isinstance(e, ValidationError) else [{"loc": (), "msg": str(e)}]
        problem = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(body)'}: {err['msg']}" for err in errors)
        letter = letter_for(subject.rsplit(".", 1)[-1], subject, data,
                            f"unreadable dead letter (stream seq {seq}, {len(data)} bytes): {problem}")
        return letter.model_copy(update={"at": at or datetime.now(UTC)}), False


# -- what operators do about dead letters (`interlock dlq resolve|replay`) ---------------------
OPEN = "open"


class CannotReplay(ValueError):
    """This dead letter's original cannot be published again (str: why, and what to do instead)."""


def status_of(status: DeadLetterStatus | None) -> str:
    """``open``, ``resolved`` or ``replayed``."""
    return status.status if status is not None else OPEN


def with_action(status: DeadLetterStatus | None, seq: int, action: DeadLetterAction) -> DeadLetterStatus:
    """``status`` (None: open) with ``action`` appended; every earlier action is kept."""
    earlier = list(status.actions) if status is not None else []
    return DeadLetterStatus(seq=seq, status=action.action, actions=[*earlier, action])


def replay_msg_id(seq: int, status: DeadLetterStatus | None) -> str:
    """The message id of the next replay of dead letter ``seq``: new for every replay, the same for
    a retried one (two racing replays of the same count are stored once by JetStream)."""
    done = sum(1 for a in (status.actions if status is not None else []) if a.action == "replayed")
    return f"dlq-replay:{s.dead_letter_key(seq)}:{done + 1}"


def replay_of(letter: DeadLetter, readable: bool, seq: int) -> tuple[str, bytes, dict[str, str]]:
    """(subject, original bytes, headers) to publish dead letter ``seq``'s original again: its own
    headers (the trace context…) without its old message id, plus :data:`~headers.REPLAY_OF`.
    Raises :class:`CannotReplay` for what must not or cannot be published again."""
    if not readable:
        raise CannotReplay(f"dead letter {seq} is not a dead letter (a foreign message on {letter.subject}); "
                           f"nothing to replay: resolve it instead")
    if letter.truncated:
        raise CannotReplay(f"dead letter {seq} keeps only the first {DATA_PREFIX_LIMIT} of the original's "
                           f"{letter.size} bytes (sha256 {letter.sha256}); it cannot be replayed: resolve it instead")
    replayable = [f for ch in c.REPLAYABLE for f in ch.filters if isinstance(f, str)]  # the streams' wildcards
    if not any(subject_matches(pattern, letter.subject) for pattern in replayable):
        raise CannotReplay(f"dead letter {seq} came from {letter.subject}, which is not a queue a replay may "
                           f"publish to ({', '.join(replayable)}): resolve it instead")
    try:
        data = base64.b64decode(letter.data_b64, validate=True)
    except ValueError as e:
        raise CannotReplay(f"dead letter {seq}: its data_b64 is not base64 ({e})") from None
    headers = {k: v for k, v in letter.headers.items() if k not in (h.MSG_ID, h.REPLAY_OF)}
    headers[h.REPLAY_OF] = s.dead_letter_key(seq)
    return letter.subject, data, headers
