"""The auditor's alert rules (pure): each fires on its condition and resolves when it passes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from interlock.auditor.alerts import AlertEngine, AlertRules
from interlock.core.workflow import load_workflow

T0 = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)
WORKFLOW = load_workflow("""
id: wf
version: 1
sla: {run_ms: 1000, steps: {a: 200}}
steps:
  a: {topic: t.a}
""")


def env(kind: str, seconds: float, step: str | None = None, **data: Any) -> dict[str, Any]:
    return {"type": kind, "at": (T0 + timedelta(seconds=seconds)).isoformat(), "step_id": step,
            "data": {**data, **({"step_id": step} if step else {})}}


def states(alerts: list[Any]) -> list[tuple[str, str]]:
    return [(a.rule, a.state) for a in alerts]


def test_run_and_step_slas_fire_while_late_and_resolve_at_the_end() -> None:
    engine = AlertEngine()
    assert engine.observe("acme", "r1", [env("RunStarted", 0, workflow_id="wf"),
                                         env("StepReady", 0, "a", topic="t.a"),
                                         env("StepDispatched", 0, "a", attempt=1, topic="t.a")]) == []
    engine.set_workflow("r1", WORKFLOW)
    assert engine.tick(T0 + timedelta(seconds=0.1)) == []
    late = engine.tick(T0 + timedelta(seconds=0.5))
    assert states(late) == [("sla_step", "firing")]
    assert (late[0].run_id, late[0].step_id, late[0].topic, late[0].context["sla_ms"]) == ("r1", "a", "t.a", 200)
    assert "interlock run timeline r1" in late[0].first_fix
    assert engine.tick(T0 + timedelta(seconds=0.6)) == [], "a firing alert is raised once"
    assert states(engine.observe("acme", "r1", [env("StepSucceeded", 0.7, "a", attempt=1)])) == [
        ("sla_step", "resolved")]
    assert states(engine.tick(T0 + timedelta(seconds=1.5))) == [("sla_run", "firing")]
    ended = engine.observe("acme", "r1", [env("RunSucceeded", 2.0)])
    assert states(ended) == [("sla_run", "resolved")] and "2000 ms" in ended[0].summary
    assert engine.firing == {}


def test_a_run_that_ends_late_between_ticks_still_leaves_a_breach_on_record() -> None:
    engine = AlertEngine()
    engine.observe("acme", "r2", [env("RunStarted", 0, workflow_id="wf")])
    engine.set_workflow("r2", WORKFLOW)
    assert states(engine.observe("acme", "r2", [env("RunFailed", 3.0, reason="x")])) == [
        ("sla_run", "firing"), ("sla_run", "resolved")]


def test_an_approval_waiting_too_long_fires_until_decided() -> None:
    engine = AlertEngine(AlertRules(approval_wait_s=60))
    engine.observe("acme", "r3", [env("RunStarted", 0, workflow_id="wf"), env("ApprovalRequested", 0, "gate")])
    assert engine.tick(T0 + timedelta(seconds=30)) == []
    fired = engine.tick(T0 + timedelta(seconds=90))
    assert states(fired) == [("approval_waiting", "firing")] and fired[0].step_id == "gate"
    assert states(engine.observe("acme", "r3", [env("ApprovalGranted", 95, "gate")])) == [
        ("approval_waiting", "resolved")]


def test_retry_rate_fires_over_the_limit_and_decays_out_of_the_window() -> None:
    engine = AlertEngine(AlertRules(retries_per_window=2, window_s=60))
    engine.observe("acme", "r4", [env("RunStarted", 0, workflow_id="wf"), env("StepReady", 0, "a", topic="t.a")])
    out = []
    for i in range(3):
        out += engine.observe("acme", "r4", [env("RetryScheduled", i, "a", attempt=i + 2)])
    assert states(out) == [("retry_rate", "firing")] and out[0].context["retries"] == 3
    assert states(engine.tick(T0 + timedelta(seconds=200))) == [("retry_rate", "resolved")]


def test_denial_rate_needs_enough_decisions() -> None:
    engine = AlertEngine(AlertRules(min_decisions=4, denial_ratio=0.5))
    engine.observe("acme", "r5", [env("RunStarted", 0, workflow_id="wf")])
    first = engine.observe("acme", "r5", [env("PolicyDecided", i, "a", decision="deny") for i in range(3)])
    assert first == [], "three decisions are too few to judge"
    fired = engine.observe("acme", "r5", [env("PolicyDecided", 3, "a", decision="deny")])
    assert states(fired) == [("denial_rate", "firing")]
    allowed = [env("PolicyDecided", 4 + i, "a", decision="allow") for i in range(5)]
    assert states(engine.observe("acme", "r5", allowed)) == [("denial_rate", "resolved")]


def test_dead_letter_growth_over_the_window() -> None:
    engine = AlertEngine(AlertRules(dead_letters_per_window=5, window_s=60))
    assert engine.dead_letters(100, T0) == []
    assert engine.dead_letters(103, T0 + timedelta(seconds=10)) == []
    fired = engine.dead_letters(110, T0 + timedelta(seconds=20))
    assert states(fired) == [("dead_letter_growth", "firing")] and fired[0].context["new"] == 10
    assert states(engine.dead_letters(110, T0 + timedelta(seconds=200))) == [("dead_letter_growth", "resolved")]


def test_latency_drift_against_the_topics_recent_median() -> None:
    engine = AlertEngine(AlertRules(drift_min_samples=5, drift_factor=3))
    engine.observe("acme", "r6", [env("RunStarted", 0, workflow_id="wf"), env("StepReady", 0, "a", topic="t.a")])
    t = 0.0
    out = []
    for attempt, took in enumerate([0.1, 0.1, 0.12, 0.09, 0.11, 0.5, 0.1], start=1):
        out += engine.observe("acme", "r6", [env("StepDispatched", t, "a", attempt=attempt, topic="t.a"),
                                             env("StepFailed", t + took, "a", attempt=attempt, final=False)])
        t += 1
    assert states(out) == [("latency_drift", "firing"), ("latency_drift", "resolved")]
    assert out[0].topic == "t.a" and out[0].context["median_s"] == 0.1


def test_an_sla_naming_an_unknown_step_is_refused_with_its_line() -> None:
    import pytest

    from interlock.core.workflow import WorkflowInvalid

    with pytest.raises(WorkflowInvalid) as caught:
        load_workflow("id: w\nversion: 1\nsla:\n  steps: {b: 100}\nsteps:\n  a: {topic: t}\n", filename="w.yaml")
    assert "w.yaml:4" in str(caught.value) and "no step 'b'" in str(caught.value)
    with pytest.raises(WorkflowInvalid, match="reserved for alerts"):
        load_workflow("id: w\nversion: 1\nsteps:\n  n: {type: notify, channel: alerts, message: hi}\n")
