"""Durable timers: JetStream message schedules, so no timer lives only in a process's memory.

A timer is a message on ``il.timer.at.{kind}.{run}.{key}`` carrying a ``Nats-Schedule: @at``
header; at its due time the server publishes it to ``il.timer.fire.{kind}``, where the
dispatcher or approval service consumes it durably. Handlers check the run's state when a timer
fires, so a timer that fires twice or late changes nothing it should not.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext

from interlock.contracts import subjects as s
from interlock.contracts.messages import TimerFired
from interlock.runtime.publish import publish


def _key(step_id: str | None, attempt: int | None) -> str:
    raw = f"{step_id or 'run'}-{attempt or 0}"
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in raw)


async def schedule(js: JetStreamContext, timer: TimerFired) -> None:
    due = timer.due_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    subject = s.timer_schedule(timer.kind, timer.run_id, _key(timer.step_id, timer.attempt))
    await publish(js, subject, timer.model_dump_json().encode(), headers={
        "Nats-Schedule": f"@at {due}",
        "Nats-Schedule-Target": s.timer_fired(timer.kind),
        "Nats-Msg-Id": f"{subject}@{due}",
    })


def due_in(ms: float) -> datetime:
    return datetime.now(UTC) + timedelta(milliseconds=ms)

