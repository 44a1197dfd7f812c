"""When a gate slot may be given back, by the run's log, and what the sweep does with an entry
nobody cleaned up (#16): pure rules (interlock.core.inflight, interlock.dispatcher.ledger)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from interlock.contracts import events as ev
from interlock.contracts.messages import GateHolder, GateScope, GateWaiter, JobResult, TimerFired
from interlock.core.ids import job_id
from interlock.core.inflight import may_be_running, peak_in_flight
from interlock.core.run import Run
from interlock.dispatcher import ledger, rules
from tests.unit.run_builders import TENANT, advance, decide, start, types, workflow

WF = workflow(a={"topic": "t", "retries": {"max_attempts": 3, "backoff_ms": 10}, "timeout_ms": 20_000,
                 "heartbeat_timeout_ms": 3000})


def dispatched() -> tuple[Run, datetime]:
    run = advance(start(WF), WF)
    decide(run, "a")
    now = datetime.now(UTC)
    rules.dispatch(run, WF, now)
    types(run)
    return run, now


def lose_heartbeat(run: Run, now: datetime) -> None:
    """Attempt 1's lease runs out: it times out for a lost heartbeat and a retry is scheduled."""
    lease = TimerFired(kind="lease", run_id=run.run_id, tenant=TENANT, step_id="a", attempt=1, due_at=now)
    rules.timer_fired(run, WF, lease, now + timedelta(seconds=4), heartbeat_seen_at=None, jitter=0.0)
    assert types(run) == ["StepTimedOut", "StepFailed", "RetryScheduled"]


def late_result(run: Run, attempt: int, now: datetime) -> None:
    result = JobResult(job_id=job_id(run.run_id, "a", attempt), run_id=run.run_id, tenant=TENANT, step_id="a",
                       attempt=attempt, ok=True, output={}, worker="w")
    rules.record_result(run, WF, result, {}, now, 0.0)


# -- when an attempt may be running ------------------------------------------------------------
def test_an_attempt_timed_out_for_a_lost_heartbeat_keeps_its_slot_until_its_late_result() -> None:
    run, now = dispatched()
    one = job_id(run.run_id, "a", 1)
    lose_heartbeat(run, now)
    state = run.steps["a"]
    assert state.status == "retry_wait"
    later = now + timedelta(seconds=5)
    # the worker may still run it (slow, or the job went to another copy): its retry must not run beside it
    assert may_be_running(run, state, 1, later)
    assert ledger.releasable(run, state, later, [one]) == []
    late_result(run, 1, later)
    assert types(run) == ["LateResultRecorded"]
    assert not may_be_running(run, state, 1, later)
    assert ledger.releasable(run, state, later, [one]) == [one]


def test_a_lost_attempt_that_never_reports_stops_by_its_deadline() -> None:
    run, now = dispatched()
    lose_heartbeat(run, now)
    state = run.steps["a"]
    deadline = state.lost_attempts[1]
    assert deadline is not None and deadline == now + timedelta(milliseconds=20_000)
    assert may_be_running(run, state, 1, deadline - timedelta(milliseconds=1))
    assert not may_be_running(run, state, 1, deadline)  # a worker stops at the job's deadline


def test_a_deadline_timeout_or_a_result_ends_the_attempt_at_once() -> None:
    run, now = dispatched()
    deadline = TimerFired(kind="deadline", run_id=run.run_id, tenant=TENANT, step_id="a", attempt=1,
                          due_at=now + timedelta(seconds=20))
    rules.timer_fired(run, WF, deadline, now + timedelta(seconds=20), heartbeat_seen_at=None, jitter=0.0)
    assert types(run)[0] == "StepTimedOut"
    state = run.steps["a"]
    assert not may_be_running(run, state, 1, now + timedelta(seconds=20))
    assert ledger.releasable(run, state, now, []) == [job_id(run.run_id, "a", 1)]


def test_the_current_attempt_keeps_its_slot_and_a_later_one_is_not_judged_before_its_dispatch() -> None:
    run, now = dispatched()
    state = run.steps["a"]
    assert ledger.releasable(run, state, now, []) == []
    assert ledger.releasable(run, state, now, [job_id(run.run_id, "a", 2)]) == []  # not dispatched yet


# -- the sweep's verdicts ------------------------------------------------------------------------
def test_an_undispatched_holder_of_a_due_step_is_dispatched_not_released() -> None:
    """The copy that took the slot was killed before its StepDispatched, or is about to append it:
    releasing the slot then would let another job in beside it. Its run is dispatched instead."""
    run = advance(start(WF), WF)
    decide(run, "a")
    types(run)
    now = datetime.now(UTC)
    one = job_id(run.run_id, "a", 1)
    assert ledger.holder_verdict(run, one, now) == "dispatch"
    rules.dispatch(run, WF, now)
    assert ledger.holder_verdict(run, one, now) == "keep"
    late_result(run, 1, now)
    assert ledger.holder_verdict(run, one, now) == "release"
    assert ledger.holder_verdict(None, one, now) == "release"  # no such run


def test_a_paused_or_ended_run_gives_its_slots_back() -> None:
    run = advance(start(WF), WF)
    decide(run, "a")
    now = datetime.now(UTC)
    one = job_id(run.run_id, "a", 1)
    run.pause(ev.RunPaused(by="op", reason="look"))
    assert ledger.holder_verdict(run, one, now) == "release"  # unpausing admits it again
    run.cancel(ev.RunCancelled(reason="done"))
    assert ledger.holder_verdict(run, one, now) == "release"
    assert ledger.releasable(run, run.steps["a"], now, [one]) == [one]


def test_a_waiter_stays_only_while_its_attempt_may_still_be_dispatched() -> None:
    run = advance(start(WF), WF)
    decide(run, "a")
    one, two = job_id(run.run_id, "a", 1), job_id(run.run_id, "a", 2)
    assert ledger.waiter_verdict(run, one) == "keep"
    rules.dispatch(run, WF, datetime.now(UTC))
    assert ledger.waiter_verdict(run, one) == "release"  # dispatched: it waits no more
    assert ledger.waiter_verdict(run, two) == "release"  # its step is in flight, not waiting


def _holder(at: float) -> GateHolder:
    return GateHolder(tenant="a", run_id="r", step_id="s", at=at)


def _waiter(since: float) -> GateWaiter:
    return GateWaiter(tenant="a", run_id="r", step_id="s", since=since)


def test_the_sweep_removes_only_the_entry_it_judged() -> None:
    """The sweep read J waiting, then read the log: J dispatched (it was woken meanwhile and holds
    the slot now). Dropping 'J' used to take its slot too, and a second job went in beside it."""
    woken = GateScope(holders={"J": _holder(at=50.0)}, waiting={"K": _waiter(since=3.0)})
    same, removed = ledger.drop_entry(woken, "J", holding=False, stamp=1.0)
    assert not removed and same.holders == woken.holders and same.waiting == woken.waiting
    # a holder judged stopped, admitted again meanwhile (a new `at`), keeps its slot too
    assert ledger.drop_entry(woken, "J", holding=True, stamp=10.0) == (woken, False)
    gone, removed = ledger.drop_entry(woken, "J", holding=True, stamp=50.0)
    assert removed and "J" not in gone.holders and "K" in gone.waiting
    still, removed = ledger.drop_entry(woken, "K", holding=False, stamp=3.0)
    assert removed and still.waiting == {} and "J" in still.holders


# -- the same rule, read from run logs --------------------------------------------------------------
def _e(kind: str, at: float, attempt: int = 1, **data: Any) -> dict[str, Any]:
    return {"type": kind, "at": datetime.fromtimestamp(at, UTC).isoformat(), "step_id": "a", "attempt": attempt,
            "data": {"topic": "t", **data}}


def test_a_retry_beside_a_lost_attempt_that_still_runs_counts_twice() -> None:
    deadline = datetime.fromtimestamp(20, UTC).isoformat()
    log = [_e("StepDispatched", 0, deadline=deadline), _e("StepTimedOut", 3, reason="heartbeat"),
           _e("StepFailed", 3), _e("StepDispatched", 3.2, attempt=2, deadline=deadline),
           _e("LateResultRecorded", 3.5), _e("StepSucceeded", 4, attempt=2)]
    assert peak_in_flight([log]) == {None: 2}
    # the retry waited for the late result: one at a time
    waited = [*log[:3], log[4], _e("StepDispatched", 3.6, attempt=2, deadline=deadline), log[5]]
    assert peak_in_flight([waited]) == {None: 1}
    # a lost attempt that never reports is in flight until its deadline
    silent = [*log[:3], _e("StepDispatched", 19, attempt=2), _e("StepSucceeded", 25, attempt=2)]
    assert peak_in_flight([silent]) == {None: 2}
    assert peak_in_flight([[*log[:3], _e("StepDispatched", 21, attempt=2)]]) == {None: 1}
    # a deadline timeout ends the attempt at once (the worker stops at the deadline)
    by_deadline = [_e("StepDispatched", 0), _e("StepTimedOut", 20, reason="deadline"), _e("StepFailed", 20),
                   _e("StepDispatched", 20.1, attempt=2), _e("StepSucceeded", 21, attempt=2)]
    assert peak_in_flight([by_deadline]) == {None: 1}
