"""Durable timers: JetStream message schedules, so no timer lives only in a process's memory.

A timer is a message on ``subjects.timer_schedule(kind, run, key)`` carrying a schedule header
(``headers.SCHEDULE``: ``@at <time>``); at its due time the server publishes it to
``subjects.timer_fired(kind)``, where the
dispatcher or approval service consumes it durably. Handlers check the run's state when a timer
fires, so a timer that fires twice or late changes nothing it should not.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext

from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.contracts.messages import TimerFired
from interlock.runtime.publish import publish


def _key(step_id: str | None, attempt: int | None) -> str:
    raw = f"{step_id or 'run'}-{attempt or 0}"
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in raw)


async def schedule(js: JetStreamContext, timer: TimerFired) -> None:
    """Schedule ``timer`` to fire at its due time (once per run, step, attempt and due time)."""
    subject = s.timer_schedule(timer.kind, timer.run_id, _key(timer.step_id, timer.attempt))
    await set_at(js, subject, timer.model_dump_json().encode(), timer.due_at, s.timer_fired(timer.kind),
                 dedupe=True)


async def set_at(js: JetStreamContext, subject: str, payload: bytes, due: datetime, target: str, *,
                 dedupe: bool = False) -> None:
    """Have the server publish ``payload`` to ``target`` at ``due``. The server keeps one schedule
    per subject: this replaces whatever ``subject`` held. ``dedupe``: stored once per subject and
    due time (a msg id), for timers that are never set again for the same time after a cancel."""
    at = due.astimezone(UTC).isoformat().replace("+00:00", "Z")
    headers = {h.SCHEDULE: f"@at {at}", h.SCHEDULE_TARGET: target}
    if dedupe:
        headers[h.MSG_ID] = f"{subject}@{at}"
    await publish(js, subject, payload, headers=headers)


async def cancel(js: JetStreamContext, subject: str, payload: bytes) -> None:
    """Cancel the schedule ``subject`` holds: a message without a schedule header replaces it, and
    the server never fires it."""
    await publish(js, subject, payload)


def due_in(ms: float) -> datetime:
    return datetime.now(UTC) + timedelta(milliseconds=ms)

