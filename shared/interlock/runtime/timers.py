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
    due = timer.due_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    subject = s.timer_schedule(timer.kind, timer.run_id, _key(timer.step_id, timer.attempt))
    await publish(js, subject, timer.model_dump_json().encode(), headers={
        h.SCHEDULE: f"@at {due}",
        h.SCHEDULE_TARGET: s.timer_fired(timer.kind),
        h.MSG_ID: f"{subject}@{due}",
    })


def due_in(ms: float) -> datetime:
    return datetime.now(UTC) + timedelta(milliseconds=ms)

