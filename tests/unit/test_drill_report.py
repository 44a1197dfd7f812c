"""The drill's stall figures: every in-flight run moving again, per kind of kill, against the goals."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from interlock.devstack import drill
from interlock.devstack.drill import STALL_GOALS, DrillReport, Kill, percentile


def kill(kind: str, moving: float | None, note: str = "") -> Kill:
    return Kill(victim="x", kind=kind, at=0.0, offset=0.0, note=note, all_moving_s=moving, in_flight=3)


def test_nearest_rank_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([3.0, 1.0, 2.0], 99) == 3.0  # the max while n < 100
    assert percentile([4.0], 50) == 4.0


def test_kills_are_judged_by_kind_against_their_goals() -> None:
    report = DrillReport(runs=10, kills_planned=5, cluster=True, seed=1, tenant="t", home="h", kills=[
        kill("service", 0.4), kill("worker", 1.9), kill("service", None),
        kill("nats", 6.5, "IL_EVENTS leader"), kill("nats", 3.0)])
    groups = report.moving_by_goal()
    assert groups == {"service or worker": [0.4, 1.9], "IL_EVENTS leader": [6.5], "other NATS node": [3.0]}
    assert set(groups) == set(STALL_GOALS)
    assert report.stall_goal_met()
    text = report.render()
    assert "after service or worker kills: p50 0.40s, p99 1.90s, max 1.90s (n=2; goal p99 <= 2s: PASS)" in text
    assert "after IL_EVENTS leader kills: p50 6.50s, p99 6.50s" in text
    assert "stall goal: PASS" in text

    report.kills.append(kill("worker", 2.5))
    assert not report.stall_goal_met()
    assert "goal p99 <= 2s: MISS" in report.render() and "stall goal: MISS" in report.render()


# -- a run that only waits for a workload limit's slot is not stalled while the slot is taken --------
def _ev(kind: str, at: float, step: str = "a", **data: Any) -> dict[str, Any]:
    return {"type": kind, "at": datetime.fromtimestamp(at, UTC).isoformat(), "step_id": step, "data": data}


THROTTLED = [_ev("StepReady", 0), _ev("PolicyDecided", 1, decision="allow"),
             _ev("StepThrottled", 2, scope="concurrency topic:llm")]


def test_a_run_waits_by_design_only_when_all_it_waits_for_is_a_slot() -> None:
    assert drill._gate_wait(THROTTLED, at=3) == {("topic", "llm")}
    assert drill._gate_wait(THROTTLED, at=1.5) == set()  # released, the dispatcher has yet to act
    with_job = [*THROTTLED, _ev("StepDispatched", 2.5, step="b")]
    assert drill._gate_wait(with_job, at=3) == set()  # a job in flight: a kill may stall it
    assert drill._gate_wait([*with_job, _ev("StepSucceeded", 2.8, step="b")], at=3) == {("topic", "llm")}
    rated = [*THROTTLED[:2], _ev("StepThrottled", 2, scope="rate topic:llm")]
    assert drill._gate_wait(rated, at=3) == set()  # a rate: not judged, counted by its whole wait
    assert drill._gate_wait([*THROTTLED, _ev("StepDispatched", 2.9)], at=3) == set()
    approved = [_ev("StepReady", 0, step="gate"), _ev("PolicyDecided", 0.1, step="gate", decision="allow"),
                _ev("ApprovalRequested", 0.2, step="gate"), _ev("ApprovalGranted", 0.3, step="gate"),
                _ev("StepSucceeded", 0.4, step="gate"), *THROTTLED]
    assert drill._gate_wait(approved, at=3) == {("topic", "llm")}  # the approval step is done
    assert drill._gate_wait(approved[:4], at=3) == set()  # granted: the step goes on


def test_a_throttled_run_counts_by_the_longest_stretch_a_slot_stood_free() -> None:
    changes = [(0.0, False), (5.0, True), (5.1, False), (9.0, True), (12.5, False)]
    assert drill._longest_free(changes, start=1.0, end=8.0) == pytest.approx(0.1)  # handed on at once
    assert drill._longest_free(changes, start=1.0, end=20.0) == pytest.approx(3.5)  # a wake was lost
    assert drill._longest_free(changes, start=10.0, end=11.0) == pytest.approx(1.0)
    assert drill._longest_free([], start=1.0, end=2.0) == pytest.approx(1.0)  # never taken: free
