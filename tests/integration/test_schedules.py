"""Workflow schedules under a real nats-server with two copies of every service: one run per tick
across a restart of the planners (which own the schedules), the missed-tick policies after downtime,
the schedules listing per tenant, and a schedule that ends when its workflow's new version drops it."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import NotFoundError

from interlock.client import Client, NotFound, Refused, WorkflowInvalid
from interlock.contracts import events as ev
from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.contracts.messages import ScheduleTimer
from interlock.core.ids import run_id_for
from interlock.core.schedule import tick_key
from interlock.planner.service import PlannerService
from tests.integration.api_fixtures import Api
from tests.integration.harness import Harness, unique
from tests.principals import Principals

pytestmark = pytest.mark.integration

DOWNTIME_S = 3.2  # the planners are away for at least three ticks of an `every: 1s` schedule




def scheduled(wf: str, tenant: str, schedule: str, version: int = 1) -> str:
    return f"""
id: {wf}
version: {version}
schedule: {schedule}
steps:
  tell: {{type: notify, channel: ticks, message: "tick {{{{ input.schedule.tick }}}}"}}
"""


def unscheduled(wf: str, version: int) -> str:
    return f"id: {wf}\nversion: {version}\nsteps:\n  tell: {{type: notify, channel: ticks, message: 'off'}}\n"


async def scheduled_runs(harness: Harness, tenant: str) -> list[dict[str, Any]]:
    """Every run of ``tenant`` (the tests' own): its id, its RunStarted events and its input."""
    js = harness.nc.jetstream()
    info = await js.stream_info(s.EVENTS_STREAM, subjects_filter=s.tenant_events(tenant))
    runs = []
    # a run's log spans several subjects (one per writer and route): each run once
    for run_id in sorted({s.parse_run_events(subject)[1] for subject in info.state.subjects or {}}):
        commits = await harness.store.read_commits(tenant, run_id)
        started = [e for c in commits for e in c.envelopes if e["type"] == ev.RunStarted.type_name]
        runs.append({"run_id": run_id, "started": started, "input": started[0]["data"]["input"] if started else None,
                     "key": started[0]["data"]["idempotency_key"] if started else None})
    return sorted(runs, key=lambda r: r["input"]["schedule"]["tick"] if r["input"] else "")


def tick_of(run: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(run["input"]["schedule"]["tick"].replace("Z", "+00:00"))


async def wait_runs(harness: Harness, tenant: str, want: int, *, after: datetime | None = None,
                    timeout: float = 30.0) -> list[dict[str, Any]]:
    """Poll until ``want`` runs with a tick after ``after`` exist (fails naming what there is)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = await scheduled_runs(harness, tenant)
        if len([r for r in runs if r["input"] and (after is None or tick_of(r) > after)]) >= want:
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {want} scheduled runs after {after} within {timeout}s: "
                                 f"{[r['key'] for r in runs]}")
        await asyncio.sleep(0.1)


async def restart_planners(harness: Harness, downtime_s: float) -> tuple[datetime, datetime]:
    """Stop both planner copies, wait ``downtime_s``, start two new ones: (stopped at, restarted at)."""
    planners = [svc for svc in harness.services if isinstance(svc, PlannerService)]
    assert len(planners) == 2
    for planner in planners:
        await planner.stop()
        harness.services.remove(planner)
    stopped = datetime.now(UTC)
    await asyncio.sleep(downtime_s)  # the downtime itself: ticks come due while no planner runs
    restarted = datetime.now(UTC)
    for _ in range(2):
        planner = PlannerService(harness.service_settings("planner"))
        await planner.start()
        harness.services.append(planner)
    return stopped, restarted


async def pending(harness: Harness, tenant: str, wf: str) -> ScheduleTimer | None:
    """The tick set for the schedule (None: none pending, or cancelled)."""
    try:
        stored = await harness.nc.jetstream().get_last_msg(s.TIMERS_STREAM, s.schedule_timer(tenant, wf))
    except NotFoundError:
        return None
    timer = ScheduleTimer.model_validate_json(stored.data or b"")
    return None if timer.cancelled or not (stored.headers or {}).get(h.SCHEDULE) else timer


async def unschedule(harness: Harness, tenant: str, wf: str, version: int) -> None:
    """Apply a version without a schedule and wait until the pending tick is cancelled and handled."""
    await harness.apply(unscheduled(wf, version))
    deadline = time.monotonic() + 15
    while await pending(harness, tenant, wf) is not None:
        assert time.monotonic() < deadline, f"{wf}: the schedule's tick is still set after its version dropped it"
        await asyncio.sleep(0.05)
    await harness.settled()


def assert_one_run_per_tick(runs: list[dict[str, Any]], tenant: str, wf: str) -> None:
    for run in runs:
        assert len(run["started"]) == 1, f"run {run['run_id']} started {len(run['started'])} times"
        key = run["key"]
        assert key == "schedule:" + run["input"]["schedule"]["tick"], (key, run["input"])
        assert run["run_id"] == str(run_id_for(tenant, wf, key)), "the run id is not the tick's"
        assert tick_of(run).microsecond == 0, "an `every: 1s` tick is a whole second"
    ticks = [run["input"]["schedule"]["tick"] for run in runs]
    assert len(ticks) == len(set(ticks)), f"a tick started two runs: {ticks}"


@pytest.mark.parametrize("missed", ["catch_up_once", "skip"])
async def test_one_run_per_tick_across_a_restart_of_both_planners(two_copies: Harness, missed: str) -> None:
    harness = two_copies
    tenant, wf = unique("sched"), unique("every")
    await harness.apply(scheduled(wf, tenant, f"{{every: 1s, missed: {missed}, tenant: {tenant}}}"))
    try:
        await wait_runs(harness, tenant, 3)
        stopped, restarted = await restart_planners(harness, DOWNTIME_S)
        await wait_runs(harness, tenant, 3, after=restarted)
    finally:
        await unschedule(harness, tenant, wf, 2)
    runs = await scheduled_runs(harness, tenant)
    assert_one_run_per_tick(runs, tenant, wf)

    # no planner ran between stopped and restarted: the ticks of that window start no run of their
    # own; catch_up_once starts one for the latest of them (handled after the restart), skip none
    during = [r for r in runs if stopped < tick_of(r) <= restarted]
    catch_ups = [r for r in runs if r["input"]["schedule"]["missed_ticks"] > 0]
    down_ticks = int(DOWNTIME_S)
    if missed == "catch_up_once":
        assert len(during) <= 1, [r["key"] for r in during]
        restart_catch_up = [r for r in catch_ups if tick_of(r) > stopped]
        assert restart_catch_up, f"no catch-up run after the downtime: {[r['key'] for r in runs]}"
        first = restart_catch_up[0]
        assert tick_of(first) >= restarted - timedelta(seconds=1)  # the latest missed tick, not the first
        assert first["input"]["schedule"]["missed_ticks"] >= down_ticks - 1, first["input"]
    else:
        assert during == [], f"skip started runs for missed ticks: {[r['key'] for r in during]}"
        assert not [r for r in catch_ups if tick_of(r) > stopped], "skip never catches up"
    # and the schedule went on after the restart, tick by tick
    assert len([r for r in runs if tick_of(r) > restarted]) >= 3


async def test_schedules_are_listed_per_tenant_with_next_tick_and_last_run(
        two_copies: Harness, principals: Principals) -> None:
    harness = two_copies
    tenant, other, wf = unique("sched"), unique("other"), unique("cron")
    await harness.apply(scheduled(wf, tenant, f'{{cron: "0 3 * * *", timezone: Europe/Berlin, tenant: {tenant}}}'))
    every_wf = unique("every")
    await harness.apply(scheduled(every_wf, tenant, f"{{every: 1s, tenant: {tenant}}}"))
    try:
        await wait_runs(harness, tenant, 1)
        async with await Client.connect(harness.url, creds=principals.person("viewer", tenant), tenant=tenant,
                                        name="schedules-viewer") as viewer:
            deadline = time.monotonic() + 10
            while True:
                rows = {row.workflow_id: row for row in await viewer.schedules()}
                ticked = rows.get(every_wf)
                if ticked is not None and ticked.last_run_status is not None and ticked.armed:
                    break
                assert time.monotonic() < deadline, f"no row with the latest tick's run: {rows}"
                await asyncio.sleep(0.1)
            cron = rows[wf]
            assert (cron.cron, cron.timezone, cron.missed, cron.armed, cron.tenant) == (
                "0 3 * * *", "Europe/Berlin", "skip", True, tenant)
            # 03:00 in Berlin is 02:00 UTC in winter, 01:00 in summer
            assert cron.next_tick.astimezone(UTC).hour in (1, 2) and cron.next_tick > datetime.now(UTC)
            assert cron.last_run_id is None  # the latest 03:00 came before the schedule did
            assert ticked.last_tick is not None and ticked.every == "1s" and ticked.next_tick > ticked.last_tick
            assert ticked.last_run_id == str(run_id_for(tenant, every_wf, tick_key(ticked.last_tick)))
            assert [r.workflow_id for r in await viewer.schedules(workflow_id=wf)] == [wf]
        async with await Client.connect(harness.url, creds=principals.person("viewer", other), tenant=other,
                                        name="schedules-other") as stranger:
            assert await stranger.schedules() == [], "another tenant's schedules are listed"
    finally:
        await unschedule(harness, tenant, every_wf, 2)
        await unschedule(harness, tenant, wf, 2)


async def test_a_new_version_moves_the_schedule_and_one_without_it_ends_it(two_copies: Harness) -> None:
    harness = two_copies
    tenant, wf = unique("sched"), unique("moves")
    await harness.apply(scheduled(wf, tenant, f'{{cron: "0 0 1 1 *", tenant: {tenant}}}'))
    deadline = time.monotonic() + 10
    while (timer := await pending(harness, tenant, wf)) is None or timer.workflow_version != "1":
        assert time.monotonic() < deadline, "version 1's schedule was not set"
        await asyncio.sleep(0.05)
    assert timer.tick > datetime.now(UTC) + timedelta(days=1)  # next new year
    await harness.apply(scheduled(wf, tenant, f"{{every: 1s, tenant: {tenant}}}", version=2))
    runs = await wait_runs(harness, tenant, 2)  # the new schedule runs at once, the old tick was replaced
    assert all(r["input"]["schedule"].get("every") == "1s" for r in runs)
    await unschedule(harness, tenant, wf, 3)
    settled_count = len(await scheduled_runs(harness, tenant))
    # nothing is pending any more, the planners have handled everything: no tick is left to start a run
    assert await pending(harness, tenant, wf) is None
    await harness.settled()
    assert len(await scheduled_runs(harness, tenant)) == settled_count
    assert_one_run_per_tick(await scheduled_runs(harness, tenant), tenant, wf)


async def test_a_bad_schedule_is_refused_naming_the_yaml_path(provisioned: str, admin_creds: Path) -> None:
    bad = """
id: bad-schedule
version: 1
schedule:
  cron: "*/5 * * *"
  timezone: Mars/Olympus
  missed: later
steps:
  tell: {type: notify, channel: ticks, message: never}
"""
    async with await Client.connect(provisioned, creds=admin_creds, name="schedules-admin") as admin:
        with pytest.raises(WorkflowInvalid) as caught:
            await admin.apply_workflow(bad, filename="bad.yaml")
        text = str(caught.value)
        assert "bad.yaml:5: schedule.cron: invalid cron expression '*/5 * * *': it has 4 field(s)" in text
        assert "bad.yaml:6: schedule.timezone: unknown time zone 'Mars/Olympus'" in text
        assert "bad.yaml:7: schedule.missed: unknown value 'later'; allowed: 'skip', 'catch_up_once'" in text
        with pytest.raises(NotFound):
            await admin.workflow("bad-schedule")  # nothing was registered
        # a valid schedule of another tenant than the one the admin acts for: refused, nothing registered
        elsewhere = unique("elsewhere")
        with pytest.raises(Refused, match=f"schedule.tenant is '{elsewhere}', but you act for tenant 'default'"):
            await admin.apply_workflow(scheduled(elsewhere, elsewhere, f"{{every: 1s, tenant: {elsewhere}}}"))
        with pytest.raises(NotFound):
            await admin.workflow(elsewhere)


async def test_the_api_lists_the_callers_tenants_schedules(api: Api, harness: Harness) -> None:
    tenant, wf = unique("sched"), unique("api")
    await harness.apply(scheduled(wf, tenant, f'{{cron: "0 0 1 1 *", missed: catch_up_once, tenant: {tenant}}}'))
    try:
        async with api.http(await api.key("viewer", tenant)) as http:
            deadline = time.monotonic() + 10
            while True:
                r = await http.get("/api/v1/schedules")
                assert r.status_code == 200, r.text
                if r.json() and r.json()[0]["armed"]:
                    break
                assert time.monotonic() < deadline, f"the schedule was not set: {r.json()}"
                await asyncio.sleep(0.05)
            (row,) = r.json()
            assert (row["workflow_id"], row["tenant"], row["cron"], row["timezone"], row["missed"]) == (
                wf, tenant, "0 0 1 1 *", "UTC", "catch_up_once")
            assert row["next_tick"].startswith(f"{datetime.now(UTC).year + 1}-01-01T00:00:00")
            assert (await http.get("/api/v1/schedules", params={"workflow": "nope"})).json() == []
            bad = await http.get("/api/v1/schedules", params={"workflow": "not a token"})
            assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem+json")
        async with api.http(await api.key("viewer")) as other:  # tenant default: not its schedule
            assert wf not in [row["workflow_id"] for row in (await other.get("/api/v1/schedules")).json()]
        async with api.http(await api.key("admin", tenant)) as admin:  # its admin may not schedule another's runs
            r = await admin.post("/api/v1/workflows", json={"source": scheduled(unique("x"), "default", "{every: 1s}")})
            assert r.status_code == 409 and "schedule.tenant is 'default'" in r.json()["detail"], r.text
    finally:
        await unschedule(harness, tenant, wf, 2)


async def test_a_tick_delivered_twice_starts_one_run_and_a_stale_tick_none(two_copies: Harness) -> None:
    harness = two_copies
    tenant, wf = unique("sched"), unique("hourly")
    await harness.apply(scheduled(wf, tenant, f"{{every: 1h, tenant: {tenant}}}"))
    try:
        deadline = time.monotonic() + 10
        while (timer := await pending(harness, tenant, wf)) is None:
            assert time.monotonic() < deadline, "the schedule was not set"
            await asyncio.sleep(0.05)
        this_hour = timer.tick - timedelta(hours=1)  # due already, the next one is not: on time
        due = timer.model_copy(update={"tick": this_hour})
        # a tick of a schedule that changed since (another hash), early: without the check it would run
        stale = timer.model_copy(update={"schedule_hash": "0" * 64})
        js = harness.nc.jetstream()  # the server's part, played by the admin: the tick comes due (twice)
        for message in (due, due, stale):
            await js.publish(s.schedule_fired(), message.model_dump_json().encode())
        await wait_runs(harness, tenant, 1)
        await harness.settled()
        runs = await scheduled_runs(harness, tenant)
        assert [r["key"] for r in runs] == [tick_key(this_hour)], "a stale tick started a run, or one ran twice"
        assert_one_run_per_tick(runs, tenant, wf)
        after = await pending(harness, tenant, wf)
        assert after is not None and after.tick == timer.tick  # the next tick is still the one set before
    finally:
        await unschedule(harness, tenant, wf, 2)


async def test_deleting_a_workflow_cancels_its_schedule(two_copies: Harness) -> None:
    harness = two_copies
    tenant, wf = unique("sched"), unique("gone")
    await harness.apply(scheduled(wf, tenant, f"{{every: 1h, tenant: {tenant}}}"))
    deadline = time.monotonic() + 10
    while await pending(harness, tenant, wf) is None:
        assert time.monotonic() < deadline, "the schedule was not set"
        await asyncio.sleep(0.05)
    kv = await harness.nc.jetstream().key_value(s.WORKFLOWS_BUCKET)
    await kv.delete(f"{wf}.latest")  # what deleting the workflow does to the registry
    await kv.delete(f"{wf}.1")
    deadline = time.monotonic() + 10
    while await pending(harness, tenant, wf) is not None:
        assert time.monotonic() < deadline, "the deleted workflow's tick is still set"
        await asyncio.sleep(0.05)
    await harness.settled()
