"""Jobs in flight: when an attempt may be running on a worker, by its run's log. One rule, in two
forms: on a run's state (:func:`may_be_running`, what the dispatch gate holds a slot for) and on
run logs (:func:`peak_in_flight`, how a concurrency limit is checked after the fact: the workload
tests, ``interlock drill`` with ``INTERLOCK_GATE_LIMITS``).

An attempt is in flight from its StepDispatched until the log shows it stopped: its result
(StepSucceeded or StepFailed of that attempt), a StepTimedOut at its deadline (a worker stops at
the job's deadline: the worker contract) or its run's end (workers are told to stop). An attempt
timed out for a lost heartbeat may still be running — its worker was slow, or its job went to
another copy of the worker — so it stays in flight until its late result (LateResultRecorded) or
its deadline, whichever comes first: a retry beside it would exceed a limit of 1 (#16).
At the same instant a dispatch counts before an outcome: the worst case.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from datetime import datetime
from typing import Any

from interlock.contracts import events as ev
from interlock.core.run import ACTIVE_ATTEMPT, Run, StepState

RESULTS = ev.kinds(ev.StepSucceeded, ev.StepFailed)
RUN_ENDINGS = ev.kinds(ev.RunSucceeded, ev.RunFailed, ev.RunDenied, ev.RunCancelled, ev.RunTimedOut)

Group = Callable[[dict[str, Any]], Hashable]
"""What a dispatch counts towards (its StepDispatched envelope -> a key, e.g. its topic)."""


def may_be_running(run: Run, state: StepState, attempt: int, now: datetime) -> bool:
    """Whether attempt ``attempt`` of the step may still be running, by the run's log (above)."""
    if run.terminal or attempt < 1 or attempt > state.attempt:
        return False
    if attempt == state.attempt and state.status in ACTIVE_ATTEMPT:
        return True
    if attempt in state.lost_attempts:
        deadline = state.lost_attempts[attempt]
        return deadline is None or now < deadline
    return False


def _parse(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


Attempt = tuple[Any, Any]  # (step id, attempt)


def _close(open_attempts: dict[Attempt, tuple[Hashable, datetime | None]], lost: set[Attempt],
           points: dict[Hashable, list[tuple[datetime, int]]], attempt: Attempt, at: datetime) -> None:
    key, deadline = open_attempts.pop(attempt)
    if attempt in lost and deadline is not None:
        at = min(at, deadline)
    lost.discard(attempt)
    points[key].append((at, -1))


def peak_in_flight(logs: Iterable[list[dict[str, Any]]], group: Group = lambda e: None) -> dict[Hashable, int]:
    """The most attempts in flight at any instant, per group of their StepDispatched."""
    return {key: max((level for _, level in levels), default=0)
            for key, levels in in_flight_levels(logs, group).items()}


def in_flight_levels(logs: Iterable[list[dict[str, Any]]], group: Group = lambda e: None
                     ) -> dict[Hashable, list[tuple[datetime, int]]]:
    """Per group of their StepDispatched, the attempts in flight from each change on, in time order."""
    points: dict[Hashable, list[tuple[datetime, int]]] = defaultdict(list)
    for events in logs:
        open_attempts: dict[Attempt, tuple[Hashable, datetime | None]] = {}  # -> group, deadline
        lost: set[Attempt] = set()  # timed out for a lost heartbeat: open until a late result
        close = functools.partial(_close, open_attempts, lost, points)
        for e in events:
            attempt = (e.get("step_id"), e.get("attempt"))
            at = datetime.fromisoformat(e["at"])
            kind = e["type"]
            if kind == ev.StepDispatched.type_name:
                open_attempts[attempt] = key_deadline = (group(e), _parse((e.get("data") or {}).get("deadline")))
                points[key_deadline[0]].append((at, +1))
            elif kind in RUN_ENDINGS:
                for other in list(open_attempts):
                    close(other, at)
            elif attempt not in open_attempts:
                continue
            elif kind == ev.StepTimedOut.type_name and (e.get("data") or {}).get("reason") == "heartbeat":
                lost.add(attempt)
            elif attempt in lost:
                if kind == ev.LateResultRecorded.type_name:
                    close(attempt, at)
            elif kind in RESULTS or kind == ev.StepTimedOut.type_name:
                close(attempt, at)
        for attempt in list(lost):  # never reported: it may have run until its deadline
            deadline = open_attempts[attempt][1]
            if deadline is not None:
                close(attempt, deadline)
    levels: dict[Hashable, list[tuple[datetime, int]]] = {}
    for key, changes in points.items():
        level, out = 0, []
        for at, delta in sorted(changes, key=lambda p: (p[0], -p[1])):
            level += delta
            out.append((at, level))
        levels[key] = out
    return levels
