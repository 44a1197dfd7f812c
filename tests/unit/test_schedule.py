"""Workflow schedules: the YAML (every problem named with its path and line), ticks in a time zone
across daylight saving time, and the missed-tick policy, as pure functions of schedule and time."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from interlock.contracts import subjects as s
from interlock.core import schedule as sc
from interlock.core.workflow import Missed, Schedule, WorkflowInvalid, load_workflow

BERLIN_DAILY = Schedule(cron="30 2 * * *", timezone="Europe/Berlin")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def workflow(schedule: str) -> str:
    return f"id: nightly\nversion: 1\nschedule: {schedule}\nsteps:\n  a: {{topic: t}}\n"


def problems(schedule: str) -> list[str]:
    with pytest.raises(WorkflowInvalid) as caught:
        load_workflow(workflow(schedule), filename="wf.yaml")
    return str(caught.value).splitlines()


def test_a_schedule_is_part_of_the_definition() -> None:
    wf = load_workflow(workflow('{cron: "*/5 * * * *", timezone: Europe/Berlin, missed: catch_up_once, '
                                'tenant: acme, input: {report: daily}}'))
    assert wf.schedule == Schedule(cron="*/5 * * * *", timezone="Europe/Berlin", missed=Missed.CATCH_UP_ONCE,
                                   tenant="acme", input={"report": "daily"})
    every = load_workflow(workflow("{every: 1h30m}")).schedule
    assert every is not None and (every.every, every.timezone, every.missed, every.tenant) == (
        "1h30m", "UTC", Missed.SKIP, "default")  # the documented defaults


def test_a_workflow_without_a_schedule_keeps_its_content_hash() -> None:
    plain = "id: nightly\nversion: 1\nsteps:\n  a: {topic: t}\n"
    scheduled = load_workflow(workflow("{every: 10m}"))
    assert load_workflow(plain).content_hash != scheduled.content_hash
    assert "schedule" not in load_workflow(plain).model_dump(exclude={"schedule"})
    assert load_workflow(plain).schedule is None


@pytest.mark.parametrize(("schedule", "expected"), [
    ('{cron: "*/5 * * *"}', "wf.yaml:3: schedule.cron: invalid cron expression '*/5 * * *': it has 4 field(s), "
                            "cron needs 5"),
    ('{cron: "61 * * * *"}', "wf.yaml:3: schedule.cron: invalid cron expression '61 * * * *': bad minute"),
    ('{cron: "0 0 30 2 *"}', "wf.yaml:3: schedule.cron: invalid cron expression '0 0 30 2 *': bad day-of-month"),
    ('{cron: "*/5 * * * *", timezone: Europe/Berlln}',
     "wf.yaml:3: schedule.timezone: unknown time zone 'Europe/Berlln' (did you mean 'Europe/Berlin'?)"),
    ('{cron: "*/5 * * * *", timezone: ../../etc/passwd}', "schedule.timezone: unknown time zone '../../etc/passwd'"),
    ("{every: 10x}", "wf.yaml:3: schedule.every: invalid interval '10x': a whole number of d, h, m and s"),
    ("{every: 0s}", "schedule.every: invalid interval '0s': it must be at least 1s"),
    ("{every: 400d}", "schedule.every: invalid interval '400d': at most 366d"),
    ("{every: 10m, missed: later}", "schedule.missed: unknown value 'later'; allowed: 'skip', 'catch_up_once'"),
    ('{every: 10m, cron: "* * * * *"}', "wf.yaml:3: schedule: give exactly one of 'cron'"),
    ("{}", "wf.yaml:3: schedule: give exactly one of 'cron'"),
    ("{every: 10m, timezone: Europe/Berlin}", "schedule: 'timezone' applies to 'cron' only"),
    ("{every: 10m, tenant: a.b}", "schedule.tenant: invalid tenant 'a.b'"),
    ("{every: 10m, input: {schedule: 1}}", "schedule.input: 'schedule' is reserved"),
    ("{every: 10m, input: [1]}", "schedule.input: expected a mapping, got a list"),
    ("{every: 10m, tenent: acme}", "wf.yaml:3: schedule: unknown field 'tenent' (did you mean 'tenant'?)"),
    ('"*/5 * * * *"', "wf.yaml:3: schedule: expected a mapping, got a string"),
])
def test_bad_schedules_are_named_by_path_and_line(schedule: str, expected: str) -> None:
    found = problems(schedule)
    assert any(expected in p for p in found), found


def test_every_problem_of_a_schedule_is_reported_at_its_own_line() -> None:
    text = ("id: nightly\nversion: 1\nschedule:\n  cron: '*/5 * * *'\n  timezone: Nowhere/City\n"
            "  missed: never\nsteps:\n  a: {topic: t}\n")
    with pytest.raises(WorkflowInvalid) as caught:
        load_workflow(text, filename="wf.yaml")
    assert [(p.location, p.line) for p in caught.value.problems] == [
        ("schedule.cron", 4), ("schedule.timezone", 5), ("schedule.missed", 6)]


def test_every_ticks_are_counted_from_the_epoch() -> None:
    ten = Schedule(every="10m")
    assert sc.next_after(ten, at("2026-12-02T04:03:12.5Z")) == at("2026-12-02T04:10:00Z")
    assert sc.next_after(ten, at("2026-12-02T04:10:00Z")) == at("2026-12-02T04:20:00Z")  # strictly after
    assert sc.latest_at_or_before(ten, at("2026-12-02T04:10:00Z")) == at("2026-12-02T04:10:00Z")
    assert sc.latest_at_or_before(ten, at("2026-12-02T04:09:59Z")) == at("2026-12-02T04:00:00Z")
    # every copy of the planner, started whenever, computes the same ticks
    assert sc.next_after(Schedule(every="7s"), at("2026-12-02T04:00:00Z")).timestamp() % 7 == 0


def test_cron_ticks_are_in_the_schedules_time_zone() -> None:
    five = Schedule(cron="*/5 * * * *", timezone="Europe/Berlin")
    assert sc.next_after(five, at("2026-12-02T04:03:00Z")) == at("2026-12-02T04:05:00Z")
    nine = Schedule(cron="0 9 * * 1-5", timezone="America/New_York")  # weekdays 09:00 in New York
    assert sc.next_after(nine, at("2026-12-04T15:00:00Z")) == at("2026-12-07T14:00:00Z")  # Friday late -> Monday
    assert sc.latest_at_or_before(nine, at("2026-12-07T14:00:00Z")) == at("2026-12-07T14:00:00Z")
    assert sc.latest_at_or_before(nine, at("2026-12-07T13:59:59Z")) == at("2026-12-04T14:00:00Z")


def test_daylight_saving_time_neither_drops_nor_doubles_a_daily_run() -> None:
    # 29 March 2026: Berlin skips 02:00-03:00; the 02:30 run happens once, right after the gap
    spring = list(sc.ticks(BERLIN_DAILY, at("2026-03-28T12:00:00Z"), at("2026-03-30T12:00:00Z")))
    assert spring == [at("2026-03-29T01:00:00Z"), at("2026-03-30T00:30:00Z")]  # 03:00 CEST, then 02:30 CEST
    # 25 October 2026: Berlin repeats 02:00-03:00; the 02:30 run happens once, not twice
    autumn = list(sc.ticks(BERLIN_DAILY, at("2026-10-24T12:00:00Z"), at("2026-10-26T12:00:00Z")))
    assert autumn == [at("2026-10-25T00:30:00Z"), at("2026-10-26T01:30:00Z")]


def test_an_on_time_tick_runs_and_sets_the_following_one() -> None:
    ten = Schedule(every="10m")
    decision = sc.decide(ten, at("2026-12-02T04:10:00Z"), at("2026-12-02T04:10:00.3Z"))
    assert decision == sc.TickDecision(run_tick=at("2026-12-02T04:10:00Z"), missed=0,
                                       next_tick=at("2026-12-02T04:20:00Z"))
    # a planner clock a little behind the server's: still that tick, and the next is not the same one again
    early = sc.decide(ten, at("2026-12-02T04:10:00Z"), at("2026-12-02T04:09:59.8Z"))
    assert (early.run_tick, early.next_tick) == (at("2026-12-02T04:10:00Z"), at("2026-12-02T04:20:00Z"))
    # late, but before the following tick: on time
    assert sc.decide(ten, at("2026-12-02T04:10:00Z"), at("2026-12-02T04:19:59Z")).run_tick == at("2026-12-02T04:10:00Z")


def test_missed_ticks_are_skipped_by_default() -> None:
    every_minute = Schedule(every="1m")
    decision = sc.decide(every_minute, at("2026-12-02T04:00:00Z"), at("2026-12-02T04:05:30Z"))
    assert decision == sc.TickDecision(run_tick=None, missed=6, next_tick=at("2026-12-02T04:06:00Z"))


def test_missed_ticks_are_caught_up_once_with_the_latest() -> None:
    every_minute = Schedule(every="1m", missed=Missed.CATCH_UP_ONCE)
    decision = sc.decide(every_minute, at("2026-12-02T04:00:00Z"), at("2026-12-02T04:05:30Z"))
    assert decision == sc.TickDecision(run_tick=at("2026-12-02T04:05:00Z"), missed=5,
                                       next_tick=at("2026-12-02T04:06:00Z"))
    daily = BERLIN_DAILY.model_copy(update={"missed": Missed.CATCH_UP_ONCE})
    week_later = sc.decide(daily, at("2026-12-01T01:30:00Z"), at("2026-12-08T12:00:00Z"))
    assert (week_later.run_tick, week_later.missed) == (at("2026-12-08T01:30:00Z"), 7)


def test_a_scheduled_runs_input_says_which_tick_it_is() -> None:
    tick = at("2026-12-02T04:05:00Z")
    five = Schedule(cron="*/5 * * * *", timezone="Europe/Berlin", input={"report": "daily"})
    assert sc.run_input(five, tick, 2) == {"report": "daily", "schedule": {
        "tick": "2026-12-02T04:05:00Z", "key": "schedule:2026-12-02T04:05:00Z", "missed_ticks": 2,
        "cron": "*/5 * * * *", "timezone": "Europe/Berlin", "local_time": "2026-12-02T05:05:00+01:00"}}
    assert sc.run_input(Schedule(every="1s"), tick)["schedule"]["every"] == "1s"
    assert sc.tick_key(tick) == "schedule:2026-12-02T04:05:00Z"


def test_the_schedule_hash_changes_with_the_schedule() -> None:
    base = Schedule(every="10m")
    assert sc.schedule_hash(base) == sc.schedule_hash(Schedule(every="10m"))
    assert sc.schedule_hash(base) != sc.schedule_hash(Schedule(every="10m", tenant="acme"))
    assert sc.schedule_hash(base) != sc.schedule_hash(Schedule(every="10m", missed=Missed.CATCH_UP_ONCE))


def test_schedule_times_must_carry_a_time_zone() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        sc.next_after(Schedule(every="1m"), datetime(2026, 12, 2))


def test_one_pending_tick_per_tenant_and_workflow() -> None:
    assert s.schedule_timer("acme", "nightly") == "il.timer.at.schedule.acme.nightly"  # literal: pinned
    assert s.schedule_fired() == "il.timer.fire.schedule"  # literal: pinned
    with pytest.raises(s.SubjectError, match="tenant"):
        s.schedule_timer("a.b", "nightly")
    assert sc.next_after(Schedule(every="1d"), at("2026-12-02T04:00:00Z")) - at("2026-12-02T00:00:00Z") == \
        timedelta(days=1)
