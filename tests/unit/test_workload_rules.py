"""Workload control without NATS (issue 16): breaker and routing rules, the dispatch hook, the
workflow knobs and their validation errors, the CLI's parsing."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from interlock.cli._workload import parse_seconds, parse_share
from interlock.client import Refused
from interlock.client._workload import new_rollout
from interlock.contracts import events as ev
from interlock.contracts import subjects as s
from interlock.contracts.messages import BreakerState, Rollout, RolloutStats, TimerFired
from interlock.core.run import Run
from interlock.core.workflow import BreakerSpec, Workflow, WorkflowInvalid, load_workflow
from interlock.dispatcher import breaker, routing, rules
from interlock.dispatcher.routing import FailFast, Hold, NoVersion, Route
from tests.unit.run_builders import decide, started_run, types, workflow

T0 = datetime(2026, 12, 2, 4, 0, tzinfo=UTC)
SPEC = BreakerSpec(failures=3, rate=0.5, window=10_000, min_calls=4, cooldown=2_000, probe_timeout=5_000)


def after(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def outcomes(state: BreakerState | None, results: list[bool], start: float = 0.0, spec: BreakerSpec = SPEC
             ) -> BreakerState:
    for i, ok in enumerate(results):
        state = breaker.record(state, spec, "acme", "llm.call", f"job-{start + i}", ok, after(start + i)) or state
    assert state is not None
    return state


# -- breaker ------------------------------------------------------------------------------------
def test_consecutive_failures_open_the_breaker_and_a_success_resets_the_count() -> None:
    spec = BreakerSpec(failures=3, cooldown=2_000)
    state = outcomes(None, [False, False, True, False, False], spec=spec)
    assert (state.state, state.consecutive_failures) == ("closed", 2)
    state = outcomes(state, [False], start=5, spec=spec)
    assert state.state == "open" and state.reason == "3 consecutive failures (limit 3)"
    assert (state.opened_at, state.retry_at, state.transitions) == (after(5), after(7), 1)
    assert state.last_change is None  # the bucket writer adds the change record (change_of)
    change = breaker.change_of(None, state, "dispatcher-1")
    assert change is not None and (change.from_state, change.to_state, change.seq) == ("closed", "open", 1)


def test_a_failure_rate_over_the_window_opens_it_once_enough_outcomes_count() -> None:
    spec = BreakerSpec(failures=None, rate=0.5, window=10_000, min_calls=4)
    state = outcomes(None, [False, True, False], spec=spec)
    assert state.state == "closed"  # 2 of 3: too few outcomes to judge
    state = outcomes(state, [True], start=3, spec=spec)
    assert state.state == "open" and "2 of 4 outcomes" in state.reason
    # outcomes older than the window no longer count
    old = outcomes(None, [False, False, True], spec=spec)
    fresh = breaker.record(old, spec, "acme", "llm.call", "late", True, after(30))
    assert fresh is not None and [o.job_id for o in fresh.recent] == ["late"]


def test_an_outcome_counts_once() -> None:
    state = outcomes(None, [False])
    assert breaker.record(state, SPEC, "acme", "llm.call", "job-0.0", False, after(1)) is None


def test_open_holds_or_fails_then_one_probe_goes_and_its_outcome_decides() -> None:
    opened = outcomes(None, [False] * 3)
    held = breaker.admit(opened, SPEC, "j1", after(3))
    assert (held.action, held.reason, held.until, held.opened_at) == ("hold", "breaker_open", opened.retry_at,
                                                                      opened.opened_at)
    failing = BreakerSpec(failures=3, cooldown=2_000, when_open="fail")
    assert breaker.admit(opened, failing, "j1", after(3)).action == "fail"
    # after the cooldown the first job is the probe: a claim to write before it goes
    probe = breaker.admit(opened, SPEC, "j1", after(4.5))
    assert probe.action == "dispatch" and probe.claim is not None
    half = probe.claim
    assert (half.state, half.probe_job) == ("half_open", "j1")
    assert breaker.admit(half, SPEC, "j1", after(4.6)).action == "dispatch"  # the same job again (a retried update)
    waiting = breaker.admit(half, SPEC, "j2", after(4.6))
    assert (waiting.action, waiting.reason) == ("hold", "breaker_probing")
    assert waiting.until == after(4.6) + breaker.recheck_after(SPEC)
    # a late result of a job sent before the breaker opened decides nothing
    late = breaker.record(half, SPEC, "acme", "llm.call", "old", True, after(5))
    assert late is not None and late.state == "half_open"
    closed = breaker.record(half, SPEC, "acme", "llm.call", "j1", True, after(5))
    assert closed is not None and (closed.state, closed.consecutive_failures, closed.probe_job) == ("closed", 0, None)
    reopened = breaker.record(half, SPEC, "acme", "llm.call", "j1", False, after(5))
    assert reopened is not None and (reopened.state, reopened.retry_at) == ("open", after(7))


def test_a_probe_without_an_outcome_is_replaced_after_the_probe_timeout() -> None:
    half = breaker.admit(outcomes(None, [False] * 3), SPEC, "j1", after(5)).claim
    assert half is not None
    replaced = breaker.admit(half, SPEC, "j2", after(10.5))
    assert replaced.action == "dispatch" and replaced.claim is not None and replaced.claim.probe_job == "j2"


# -- routing ------------------------------------------------------------------------------------
def rollout(status: str = "active", share: float = 0.25) -> Rollout:
    return Rollout(tenant="acme", topic="llm.call", stable="1.4", canary="2.0", share=share, started_at=T0,
                   status=status, min_jobs=3, window_s=60, canary_stats=RolloutStats(version="2.0"),
                   stable_stats=RolloutStats(version="1.4"))


def test_the_canary_gets_its_share_by_the_job_id() -> None:
    jobs = [f"run-{i}:a@1" for i in range(2000)]
    routes = [routing.choose(j, None, rollout(), set()) for j in jobs]
    canary = sum(1 for r in routes if isinstance(r, Route) and r.route == "canary")
    assert 400 < canary < 600  # 25% of 2000, give or take
    assert routes == [routing.choose(j, None, rollout(), set()) for j in jobs]  # the same job, the same way
    assert {(r.version, r.route) for r in routes if isinstance(r, Route)} == {("2.0", "canary"), ("1.4", "stable")}


def test_a_finished_rollout_routes_everything_to_one_version() -> None:
    assert routing.choose("j", None, rollout("promoted"), set()) == Route("2.0", "stable")
    assert routing.choose("j", None, rollout("rolled_back"), set()) == Route("1.4", "stable")
    assert routing.choose("j", None, rollout("aborted"), set()) == Route("1.4", "stable")


def test_a_version_range_picks_the_newest_live_fitting_version_or_holds() -> None:
    assert routing.choose("j", ">=2,<3", None, {"1.9", "2.1", "2.10", "3.0"}) == Route("2.10", "range")
    held = routing.choose("j", ">=2,<3", None, {"1.9", "3.0"})
    assert isinstance(held, NoVersion) and "1.9, 3.0" in held.message
    assert routing.choose("j", None, None, {"1.9"}) == Route()
    # a rollout still has to respect the step's range
    assert routing.choose("j", "<2", rollout(share=1.0), set()) == Route("1.4", "stable")
    assert isinstance(routing.choose("j", ">=3", rollout(), set()), NoVersion)


def test_a_rollout_is_rolled_back_on_failures_or_latency_and_promoted_after_its_window() -> None:
    r = rollout()
    for i in range(3):
        r = routing.record(r, f"s{i}", "1.4", True, 100, after(1)) or r
    for i in range(2):
        r = routing.record(r, f"c{i}", "2.0", False, 100, after(2)) or r
    assert r.status == "active"  # fewer than min_jobs canary jobs: no verdict yet
    assert routing.record(r, "c1", "2.0", False, 100, after(2)) is None  # counted once
    r = routing.record(r, "c2", "2.0", True, 100, after(2)) or r
    assert r.status == "rolled_back" and "failure rate 67%" in r.reason
    assert routing.record(r, "c3", "2.0", True, 100, after(3)) is None  # ended: counts nothing

    slow = rollout()
    for i in range(3):
        slow = routing.record(slow, f"s{i}", "1.4", True, 100, after(1)) or slow
        slow = routing.record(slow, f"c{i}", "2.0", True, 400, after(1)) or slow
    assert slow.status == "rolled_back" and "latency" in slow.reason

    good = rollout()
    for i in range(3):
        good = routing.record(good, f"c{i}", "2.0", True, 100, after(1)) or good
    assert good.status == "active"
    good = routing.record(good, "c3", "2.0", True, 100, after(61)) or good
    assert good.status == "promoted" and good.routing_version == "2.0"


def test_starting_a_rollout_names_what_is_wrong() -> None:
    def start(to: str, live: set[str], stable: str | None = None, share: float = 0.1) -> Rollout:
        return new_rollout("acme", "llm.call", to, share, live, stable=stable, now=T0, by="ops", window_s=60,
                           min_jobs=5, max_failure_delta=0.05, max_latency_ratio=1.5)

    assert (start("2", {"1", "2"}).stable, start("2", {"1", "2"}).canary) == ("1", "2")
    with pytest.raises(Refused, match=r"no live worker .* runs version '3'"):
        start("3", {"1", "2"})
    with pytest.raises(Refused, match="name it with --from"):
        start("3", {"1", "2", "3"})
    assert start("3", {"1", "2", "3"}, stable="1").stable == "1"
    with pytest.raises(Refused, match="share one subject token"):
        start("2.1", {"2.1", "2_1"})
    with pytest.raises(Refused, match="at most 100%"):
        start("2", {"1", "2"}, share=1.5)


# -- the dispatch hook ----------------------------------------------------------------------------
def released_run(**step: object) -> tuple[Workflow, Run]:
    wf = workflow(a={"topic": "t.a", **step})
    run = started_run(wf)
    decide(run, "a")
    run.collect_events()
    return wf, run


def test_dispatch_records_the_route_and_publishes_to_the_versions_subject() -> None:
    wf, run = released_run()
    [effect] = rules.dispatch(run, wf, T0, {"a": Route("2.0", "canary")})
    [event] = run.collect_events()
    data: Any = getattr(event, "data")  # noqa: B009 - an aggregate event's data (the library's type omits it)
    assert (data.agent_version, data.route) == ("2.0", "canary")
    assert isinstance(effect, rules.PublishJob) and effect.job.agent_version == "2.0"
    assert s.versioned_job("default", "2.0", "t.a") == f"{s.PREFIX}.vjob.default.2_0.t.a"


def test_a_held_job_gets_one_event_per_hold_and_a_recheck_timer_each_time() -> None:
    wf, run = released_run(breaker={"failures": 1})
    hold = Hold("breaker_open", after(5), "open", breaker_opened_at=T0)
    [timer] = rules.dispatch(run, wf, T0, {"a": hold})
    assert isinstance(timer, TimerFired)
    assert types(run) == [ev.StepHeld.type_name]
    run.collect_events()
    assert (timer.kind, timer.due_at, run.steps["a"].status) == ("breaker", after(5), "released")
    assert len(rules.dispatch(run, wf, after(5), {"a": hold})) == 1
    assert types(run) == []  # the same hold: no second event
    rules.dispatch(run, wf, after(5), {"a": Hold("breaker_probing", after(6))})
    assert types(run) == [ev.StepHeld.type_name]
    run.collect_events()
    rules.dispatch(run, wf, after(6), {})
    assert types(run) == [ev.StepDispatched.type_name]


def test_fail_fast_fails_the_step_without_dispatching() -> None:
    wf, run = released_run(breaker={"failures": 1, "when_open": "fail"})
    assert rules.dispatch(run, wf, T0, {"a": FailFast("breaker open")}) == []
    [event] = run.collect_events()
    data: Any = getattr(event, "data")  # noqa: B009
    assert data.final and data.error.kind == "circuit_open" and run.steps["a"].status == "failed"


# -- the workflow knobs ---------------------------------------------------------------------------
def test_breaker_and_version_range_parse_and_leave_older_definitions_hashes_alone() -> None:
    wf = load_workflow(textwrap.dedent("""
        id: wf
        version: 1
        steps:
          a:
            topic: t
            agent_version: ">=2,<3"
            breaker: {failures: 5, rate: 0.5, window: 60s, cooldown: 500ms, when_open: fail}
          b: {topic: t}
    """))
    spec = wf.steps["a"].breaker
    assert spec is not None and (spec.window, spec.cooldown, spec.when_open) == (60_000, 500, "fail")
    plain = load_workflow("id: wf\nversion: 1\nsteps:\n  b: {topic: t}\n")
    assert "breaker" not in plain.model_dump_json() or plain.content_hash == load_workflow(
        "id: wf\nversion: 1\nsteps:\n  b: {topic: t}\n").content_hash
    # a definition without the new fields hashes as it did before they existed
    assert plain.content_hash == _hash_without_new_fields(plain)


def _hash_without_new_fields(wf: object) -> str:
    import hashlib
    import json

    from interlock.core.workflow._model import _ADDED_LATER, _STEP_ADDED_LATER
    dumped = wf.model_dump(mode="json", exclude=set(_ADDED_LATER), by_alias=True)  # type: ignore
    for step in dumped["steps"].values():
        for name in _STEP_ADDED_LATER:
            step.pop(name, None)
    return hashlib.sha256(json.dumps(dumped, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@pytest.mark.parametrize(("step", "location", "message"), [
    ("breaker: {failures: 0}", "steps.a.breaker.failures", "greater than or equal to 1"),
    ("breaker: {window: soon}", "steps.a.breaker.window", "invalid duration 'soon'"),
    ("breaker: {rate: 1.5}", "steps.a.breaker.rate", "less than or equal to 1"),
    ("breaker: {when_open: retry}", "steps.a.breaker.when_open", "allowed: 'wait', 'fail'"),
    ("breaker: {failures: null}", "steps.a.breaker", "needs 'failures' or 'rate'"),
    ("breaker: {cooldwn: 5s}", "steps.a.breaker", "did you mean 'cooldown'?"),
    ("agent_version: '>=2,<<3'", "steps.a.agent_version", "invalid agent version range '>=2,<<3'"),
])
def test_bad_knobs_name_their_yaml_path(step: str, location: str, message: str) -> None:
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow(f"id: wf\nversion: 1\nsteps:\n  a:\n    topic: t\n    {step}\n")
    [problem] = info.value.problems
    assert problem.location == location and message in problem.message, (problem.location, problem.message)


def test_the_knobs_apply_to_job_steps_only() -> None:
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow("id: wf\nversion: 1\nsteps:\n  a: {type: notify, breaker: {failures: 1}}\n")
    assert [(p.location, p.message) for p in info.value.problems] == [
        ("steps.a.breaker", "'breaker' only applies to job steps")]


def test_cli_parsing() -> None:
    assert parse_share("10%") == pytest.approx(0.1) and parse_share("0.25") == 0.25 and parse_share("50") == 0.5
    with pytest.raises(ValueError, match="at most 100%"):
        parse_share("150%")
    assert parse_seconds("5m") == 300 and parse_seconds("90") == 90 and parse_seconds("1h") == 3600
    with pytest.raises(ValueError, match="duration"):
        parse_seconds("soon")
