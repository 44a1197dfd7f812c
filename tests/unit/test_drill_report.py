"""The drill's stall figures: every in-flight run moving again, per kind of kill, against the goals."""

from __future__ import annotations

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
