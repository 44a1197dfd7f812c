"""What a run's log says about the gate entries of its jobs (#16), as pure functions: which slots
may be given back now, and what the dispatcher's sweep does with an entry nobody cleaned up.

A slot is given back only once the log shows its attempt stopped
(:func:`interlock.core.inflight.may_be_running`: its result, a timeout at its deadline, the run's
end; an attempt timed out for a lost heartbeat keeps its slot until its late result or its
deadline, so that its retry never runs beside it beyond the limit).

The sweep reads a gate entry, then the run's log, then changes the entry: a check across two
stores that other copies change meanwhile. So it never takes a slot from a job that may still be
dispatched (a due job's run is dispatched instead: the log's optimistic concurrency decides
whether that job goes, and it keeps its slot if so), and it removes an entry only if that entry
is still the one it judged (:func:`drop_entry`): a job woken from the queue meanwhile, or
admitted again, keeps its slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from interlock.contracts.messages import GateScope
from interlock.core.ids import job_id, parse_job_id
from interlock.core.inflight import may_be_running
from interlock.core.run import Run, StepState
from interlock.dispatcher import gate

Verdict = Literal["keep", "release", "dispatch"]
WAITS = ("released", "retry_wait")  # a step whose next attempt may still be dispatched


def releasable(run: Run, state: StepState, now: datetime, jobs: Iterable[str] = ()) -> list[str]:
    """The step's jobs whose slots (or places in queues) may be given back now: the current
    attempt's, and ``jobs`` (a late result's, a timer's attempt), once the log shows they stopped;
    for an ended run, also the attempt that waited in a queue."""
    out = []
    for job in dict.fromkeys([*([state.job_id] if state.job_id else []), *jobs]):
        try:
            _, _, attempt = parse_job_id(job)
        except ValueError:
            continue
        if attempt > state.attempt and not run.terminal:
            continue  # not dispatched yet: its slot is for its dispatch
        if not may_be_running(run, state, attempt, now):
            out.append(job)
    if run.terminal and state.throttled:
        out.append(job_id(run.run_id, state.step_id, state.throttled))
    return out


def _next_attempt(run: Run | None, job: str) -> tuple[StepState | None, int]:
    if run is None or run.terminal:
        return None, 0
    try:
        _, step_id, attempt = parse_job_id(job)
    except ValueError:
        return None, 0
    return run.steps.get(step_id), attempt


def holder_verdict(run: Run | None, job: str, now: datetime) -> Verdict:
    """A slot holder the sweep found (``run``: its run, None if it does not exist): ``keep`` while
    its attempt may be running, ``dispatch`` its run while the job may still be dispatched (the
    dispatch uses the slot, or the sweep judges again), else ``release``."""
    state, attempt = _next_attempt(run, job)
    if state is None or run is None:
        return "release"
    if attempt <= state.attempt:
        return "keep" if may_be_running(run, state, attempt, now) else "release"
    if attempt == state.attempt + 1 and state.status in WAITS and not run.paused:
        return "dispatch"
    return "release"  # a paused run takes a slot again when it is unpaused


def waiter_verdict(run: Run | None, job: str) -> Verdict:
    """A waiting job the sweep found: ``keep`` while its attempt may still be dispatched."""
    state, attempt = _next_attempt(run, job)
    if state is not None and attempt == state.attempt + 1 and state.status in WAITS:
        return "keep"
    return "release"


def drop_entry(state: GateScope, job: str, holding: bool, stamp: float) -> tuple[GateScope, bool]:
    """The limit's state without the entry the sweep judged — ``job``'s slot (``holding``) or its
    place in the queue, taken at ``stamp`` — if that entry is still there as it was; whether it
    was removed. A job that was woken meanwhile (from the queue to a slot) or admitted again
    (a new ``at``) is left alone."""
    if holding:
        holder = state.holders.get(job)
        same = holder is not None and holder.at == stamp
    else:
        waiter = state.waiting.get(job)
        same = waiter is not None and waiter.since == stamp
    return (gate.drop(state, job, holding=holding), True) if same else (state, False)
