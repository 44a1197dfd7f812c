"""Jobs in flight, read from run logs: how a concurrency limit is checked after the fact (the
workload tests, ``interlock drill`` with ``INTERLOCK_GATE_LIMITS``).

An attempt is in flight from its StepDispatched to its first outcome (StepSucceeded, StepFailed
or StepTimedOut of that attempt) or, failing that, its run's terminal event. At the same instant
a dispatch counts before an outcome: the worst case.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from datetime import datetime
from typing import Any

from interlock.contracts import events as ev

OUTCOMES = ev.kinds(ev.StepSucceeded, ev.StepFailed, ev.StepTimedOut)
RUN_ENDINGS = ev.kinds(ev.RunSucceeded, ev.RunFailed, ev.RunDenied, ev.RunCancelled, ev.RunTimedOut)

Group = Callable[[dict[str, Any]], Hashable]
"""What a dispatch counts towards (its StepDispatched envelope -> a key, e.g. its topic)."""


def peak_in_flight(logs: Iterable[list[dict[str, Any]]], group: Group = lambda e: None) -> dict[Hashable, int]:
    """The most attempts in flight at any instant, per group of their StepDispatched."""
    points: dict[Hashable, list[tuple[datetime, int]]] = defaultdict(list)
    for events in logs:
        open_attempts: dict[tuple[Any, Any], Hashable] = {}
        for e in events:
            attempt = (e.get("step_id"), e.get("attempt"))
            at = datetime.fromisoformat(e["at"])
            if e["type"] == ev.StepDispatched.type_name:
                open_attempts[attempt] = key = group(e)
                points[key].append((at, +1))
            elif e["type"] in OUTCOMES and attempt in open_attempts:
                points[open_attempts.pop(attempt)].append((at, -1))
            elif e["type"] in RUN_ENDINGS:
                for key in open_attempts.values():
                    points[key].append((at, -1))
                open_attempts.clear()
    peaks = {}
    for key, changes in points.items():
        level = peak = 0
        for _, delta in sorted(changes, key=lambda p: (p[0], -p[1])):
            level += delta
            peak = max(peak, level)
        peaks[key] = peak
    return peaks
