"""Workflow schedules as pure functions of the schedule and the time: ticks, keys, missed-tick policy.

A tick is an instant (UTC). Every copy of the planner computes the same ticks from the same
schedule, and a tick's run is keyed by the tick (idempotency key ``schedule:{tick}``), so however
often a tick is handled — two planner copies, a redelivery after a crash, a timer set twice — it
starts one run.

A tick is **on time** when the planner handles it before the following tick is due. When the
planner handles a tick later than that (no planner ran, the server was down), the ticks from it to
the latest one due were **missed**: ``missed: skip`` starts no run for them, ``missed:
catch_up_once`` starts one run for the latest of them. Either way the schedule goes on with the
first tick after now.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cronsim import CronSim

from interlock.core.workflow import Missed, Schedule, every_seconds, zone

KEY_PREFIX = "schedule:"
MAX_COUNTED = 10_000
"""Missed cron ticks are counted up to this many (a week of per-minute ticks): counting walks them
one by one, and the handler should not spend seconds on a number. ``every`` ticks are counted by
arithmetic, up to the same bound."""


def tick_key(tick: datetime) -> str:
    """The idempotency key of ``tick``'s run: ``schedule:2026-12-02T04:05:00Z``."""
    return KEY_PREFIX + iso(tick)


def iso(moment: datetime) -> str:
    """RFC 3339 UTC, whole seconds unless the moment has a fraction: ``2026-12-02T04:05:00Z``."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def schedule_hash(schedule: Schedule) -> str:
    """sha256 of the schedule's canonical JSON: a pending tick of a schedule changed since is stale."""
    canonical = json.dumps(schedule.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("schedule times must be timezone-aware")
    return moment.astimezone(UTC)


def next_after(schedule: Schedule, moment: datetime) -> datetime:
    """The first tick strictly after ``moment`` (UTC)."""
    moment = _utc(moment)
    if schedule.every is not None:
        step = every_seconds(schedule.every)
        epoch_s = moment.timestamp()
        return datetime.fromtimestamp((int(epoch_s // step) + 1) * step, UTC)
    assert schedule.cron is not None
    local = moment.astimezone(zone(schedule.timezone))
    return _utc(next(iter(CronSim(schedule.cron, local))))


def latest_at_or_before(schedule: Schedule, moment: datetime) -> datetime:
    """The latest tick at or before ``moment`` (UTC)."""
    moment = _utc(moment)
    if schedule.every is not None:
        step = every_seconds(schedule.every)
        return datetime.fromtimestamp(int(moment.timestamp() // step) * step, UTC)
    assert schedule.cron is not None
    local = moment.astimezone(zone(schedule.timezone))
    before = _utc(next(iter(CronSim(schedule.cron, local, reverse=True))))
    following = next_after(schedule, before)
    return following if following <= moment else before


def ticks(schedule: Schedule, after: datetime, until: datetime) -> Iterator[datetime]:
    """Ticks in ``(after, until]``, oldest first."""
    tick = next_after(schedule, after)
    while tick <= _utc(until):
        yield tick
        tick = next_after(schedule, tick)


def _count(schedule: Schedule, first: datetime, last: datetime) -> int:
    """Ticks in ``[first, last]`` (both ticks), counted up to :data:`MAX_COUNTED`."""
    if last < first:
        return 0
    if schedule.every is not None:
        return min(MAX_COUNTED, int((last - first).total_seconds()) // every_seconds(schedule.every) + 1)
    n = 1
    for _ in ticks(schedule, first, last):
        n += 1
        if n >= MAX_COUNTED:
            break
    return n


@dataclass(frozen=True)
class TickDecision:
    """What the planner does with a tick that came due."""

    run_tick: datetime | None
    """The tick to start a run for (None: missed and skipped)."""
    missed: int
    """Ticks that came due while no planner handled them and start no run of their own."""
    next_tick: datetime
    """The tick to set next (always after now)."""


def decide(schedule: Schedule, tick: datetime, now: datetime) -> TickDecision:
    """The missed-tick policy applied to ``tick``, handled at ``now``."""
    tick, now = _utc(tick), _utc(now)
    following = next_after(schedule, tick)
    if now < following:  # on time (or early, by a clock that runs behind the server's)
        return TickDecision(run_tick=tick, missed=0, next_tick=following)
    latest = latest_at_or_before(schedule, now)
    due = _count(schedule, tick, latest)
    upcoming = next_after(schedule, now)
    if schedule.missed is Missed.CATCH_UP_ONCE:
        return TickDecision(run_tick=latest, missed=due - 1, next_tick=upcoming)
    return TickDecision(run_tick=None, missed=due, next_tick=upcoming)


def run_input(schedule: Schedule, tick: datetime, missed: int = 0) -> dict[str, Any]:
    """A scheduled run's input: the schedule's ``input`` plus ``schedule``, which says which tick it is."""
    about: dict[str, Any] = {"tick": iso(tick), "key": tick_key(tick), "missed_ticks": missed}
    if schedule.cron is not None:
        about |= {"cron": schedule.cron, "timezone": schedule.timezone,
                  "local_time": tick.astimezone(zone(schedule.timezone)).isoformat()}
    else:
        about |= {"every": schedule.every}
    return {**(schedule.input or {}), "schedule": about}

