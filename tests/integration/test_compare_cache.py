"""Operator tools of issue 17 on the real services (two copies of each): compare runs, failures
grouped by breakpoint, and the result cache (a hit records its source and calls no agent; never
across tenants; a policy deny wins over a cached output)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import pytest
from nats.js.errors import KeyNotFoundError

from interlock.auditor.service import AuditorService
from interlock.client import Client
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.contracts.messages import CacheEntry
from interlock.identity import permission_violation
from interlock.runtime.kvkeys import matching_keys
from interlock.worker import FatalError, JobContext, Worker
from tests.integration.api_fixtures import Api
from tests.integration.harness import Harness, types, unique, watched
from tests.integration.test_cli import cli
from tests.integration.test_governance import Bundles, bundles, with_rules
from tests.principals import Principals

pytestmark = pytest.mark.integration
__all__ = ["bundles"]  # the fixture, used by name


@pytest.fixture
async def doubled(harness: Harness) -> Harness:
    """The harness with a second copy of every service running."""
    await harness.start_services()
    return harness


@pytest.fixture
async def viewer(harness: Harness, principals: Principals) -> AsyncIterator[Client]:
    """A person with the viewer role (reads runs and events, asks queries) in the harness's tenant."""
    async with await Client.connect(harness.url, creds=principals.person("viewer", harness.tenant),
                                    name="compare-viewer") as client:
        yield client


def echo_worker(topic: str, calls: list[Any], tenant: str | None = None) -> Worker:
    worker = Worker(unique("echo"), tenant=tenant)

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, Any]:
        calls.append((ctx.job.run_id, ctx.job.step_id, ctx.input))
        mode = (ctx.input or {}).get("mode") if isinstance(ctx.input, dict) else None
        if mode:
            raise FatalError(f"{mode} broke")
        return {"echo": ctx.input}

    return worker


async def until(probe: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.05)


# -- compare runs ------------------------------------------------------------------------------
async def test_diff_marks_the_first_divergence_of_two_runs_that_differ_in_one_input(
        doubled: Harness, viewer: Client, api: Api) -> None:
    harness = doubled
    wf, topic = unique("diff"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  fetch: {{topic: {topic}, input: {{region: eu}}}}
  plan: {{topic: {topic}, depends_on: [fetch], input: {{size: '{{{{ input.size }}}}'}}}}
  apply: {{topic: {topic}, depends_on: [plan], input: {{go: true}}}}
""")
    calls: list[Any] = []
    await harness.start_worker(echo_worker(topic, calls))
    run_a = await harness.trigger(wf, {"size": 3, "password": "hunter2"})
    run_b = await harness.trigger(wf, {"size": 4, "password": "hunter2"})
    for run_id in (run_a, run_b):
        assert types(await harness.wait_end(run_id))[-1] == "RunSucceeded"

    result = await viewer.run_diff(run_a, run_b)
    doc = result.as_dict()
    assert doc["first_divergence"] == {"step_id": "plan", "fields": ["input", "output"]}
    by_step = {d["step_id"]: d for d in doc["steps"]}
    assert list(by_step) == ["fetch", "plan", "apply"]
    assert by_step["fetch"]["differs"] == [] and by_step["apply"]["differs"] == []
    assert not by_step["fetch"]["first_divergence"] and by_step["plan"]["first_divergence"]
    assert (by_step["plan"]["a"]["input"], by_step["plan"]["b"]["input"]) == ({"size": 3}, {"size": 4})
    assert by_step["plan"]["a"]["decision"] == "allow" and by_step["plan"]["a"]["attempts"] == 1
    assert by_step["plan"]["a"]["duration_ms"] is not None
    assert "input" in doc["run_differs"]
    # the run inputs' password is sealed in the log: shown redacted, never in clear
    assert doc["a"]["input"]["password"] == "[sensitive]"
    assert "hunter2" not in repr(doc)

    same = await viewer.run_diff(run_a, run_a)
    assert same.first_divergence is None

    shown = await cli(harness, "run", "diff", run_a, run_b)
    assert shown.exit_code == 1, shown.output  # 1: the runs differ
    assert "first divergence: step plan (input, output)" in shown.stdout
    assert '  plan.input: a={"size": 3}' in shown.stdout and "hunter2" not in shown.stdout
    marked = [line for line in shown.stdout.splitlines() if line.lstrip().startswith("▶")]
    assert len(marked) == 1 and " plan " in marked[0], shown.stdout
    as_json = await cli(harness, "run", "diff", run_a, run_b, "--json")
    assert json.loads(as_json.stdout)["first_divergence"] == {"step_id": "plan", "fields": ["input", "output"]}
    assert (await cli(harness, "run", "diff", run_a, run_a)).exit_code == 0

    viewer_key = await api.key("viewer", harness.tenant)
    async with api.http(viewer_key) as http:
        by_path = await http.get(f"/api/v1/workflow-runs/{run_a}/diff/{run_b}")
        by_query = await http.get(f"/api/v1/workflow-runs/{run_a}/diff", params={"against": run_b})
        missing = await http.get(f"/api/v1/workflow-runs/{run_a}/diff/{unique('nope')}")
    assert by_path.status_code == 200, by_path.text
    assert by_path.json()["first_divergence"] == {"step_id": "plan", "fields": ["input", "output"]}
    assert by_query.json() == by_path.json()
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/problem+json")


async def test_failures_group_failed_runs_by_the_step_and_error_where_they_broke(
        doubled: Harness, auditor: AuditorService, viewer: Client, api: Api) -> None:
    harness = doubled
    wf, topic = unique("fails"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  first: {{topic: {topic}, input: {{mode: '{{{{ input.first }}}}'}}}}
  second: {{topic: {topic}, depends_on: [first], input: {{mode: '{{{{ input.second }}}}'}}}}
""")
    calls: list[Any] = []
    await harness.start_worker(echo_worker(topic, calls))
    inputs = [{"first": "disk", "second": ""}, {"first": "disk", "second": ""}, {"first": "", "second": "quota"},
              {"first": "disk", "second": ""}, {"first": "", "second": ""}]
    runs = [await harness.trigger(wf, run_input) for run_input in inputs]
    for run_id in runs:
        await harness.wait_end(run_id)

    async def all_projected() -> bool:
        rows = await auditor.projection.runs(tenant=harness.tenant, workflow_id=wf, status=None, limit=10)
        return len(rows) == 5 and all(r["status"] not in ("running", "compensating") for r in rows)

    await until(all_projected, "the five runs projected")
    groups = [g.as_dict() for g in await viewer.failures(wf, since=datetime.now(UTC) - timedelta(hours=1))]
    assert [(g["step_id"], g["error"], g["runs"]) for g in groups] == [
        ("first", "disk broke", 3), ("second", "quota broke", 1)]
    assert set(groups[0]["run_ids"]) == {runs[0], runs[1], runs[3]}
    assert await viewer.failures(wf, since=datetime.now(UTC) + timedelta(minutes=1)) == []

    table = await cli(harness, "run", "failures", wf, "--since", "7d")
    assert table.exit_code == 0, table.output
    lines = [line.split() for line in table.stdout.splitlines() if "broke" in line]
    assert [line[:2] for line in lines] == [["3", "first"], ["1", "second"]], table.stdout
    bad_since = await cli(harness, "run", "failures", wf, "--since", "a week")
    assert bad_since.exit_code != 0 and "--since" in bad_since.output

    viewer_key = await api.key("viewer", harness.tenant)
    async with api.http(viewer_key) as http:
        page = await http.get(f"/api/v1/workflows/{wf}/failures", params={"since": "7d"})
        bad = await http.get(f"/api/v1/workflows/{wf}/failures", params={"since": "a week"})
    assert page.status_code == 200, page.text
    assert [(g["step_id"], g["runs"]) for g in page.json()["items"]] == [("first", 3), ("second", 1)]
    assert bad.status_code == 422 and "a week" in bad.json()["detail"]


# -- result cache ------------------------------------------------------------------------------
def cached_workflow(wf: str, topic: str) -> str:
    return f"""
id: {wf}
version: 1
steps:
  lookup:
    topic: {topic}
    input: {{q: '{{{{ input.q }}}}'}}
    cache: {{key: '{{{{ input.q }}}}', ttl: 1h}}
  report: {{topic: {topic}, depends_on: [lookup], input: {{found: '{{{{ steps.lookup.output }}}}'}}}}
"""


async def cache_entries(harness: Harness, tenant: str, job_hash: str) -> list[CacheEntry]:
    kv = await harness.nc.jetstream().key_value(s.CACHE_BUCKET)
    found = []
    for key in await matching_keys(kv, f"{tenant}.>"):
        try:
            entry = CacheEntry.model_validate_json((await kv.get(key)).value or b"")
        except KeyNotFoundError:
            continue
        if entry.job_hash == job_hash:
            found.append(entry)
    return found


async def first_run(harness: Harness, wf: str, calls: list[Any]) -> tuple[str, str]:
    """Run ``wf`` once (the job runs), wait until its output is in the cache; (run id, job hash)."""
    run_id = await harness.trigger(wf, {"q": "capital of france"})
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded"
    assert [c[1] for c in calls] == ["lookup", "report"]
    ready = next(e for e in events if e["type"] == "StepReady" and e["step_id"] == "lookup")
    job_hash = ready["data"]["job_hash"]
    entries = await until(lambda: cache_entries(harness, harness.tenant, job_hash), "the cache entry")
    assert [(e.run_id, e.source_step_id, e.tenant) for e in entries] == [(run_id, "lookup", harness.tenant)]
    return run_id, job_hash


async def test_a_cache_hit_is_recorded_with_its_source_and_the_agent_is_not_called_again(
        doubled: Harness) -> None:
    harness = doubled
    wf, topic = unique("cache"), unique("t")
    await harness.apply(cached_workflow(wf, topic))
    calls: list[Any] = []
    await harness.start_worker(echo_worker(topic, calls))
    source, job_hash = await first_run(harness, wf, calls)

    second = await harness.trigger(wf, {"q": "capital of france"})
    events = await harness.wait_end(second)
    assert types(events)[-1] == "RunSucceeded"
    (hit,) = [e for e in events if e["type"] == "StepCacheHit"]
    assert (hit["step_id"], hit["data"]["source_run_id"], hit["data"]["source_step_id"], hit["data"]["job_hash"]) \
        == ("lookup", source, "lookup", job_hash)
    assert hit["service"] == "dispatcher"
    assert "StepDispatched" not in types(events, "lookup"), "a cache hit dispatches no job"
    succeeded = next(e for e in events if e["type"] == "StepSucceeded" and e["step_id"] == "lookup")
    assert (succeeded["attempt"], succeeded["data"]["worker"]) == (0, "cache")
    assert succeeded["data"]["output"] == {"echo": {"q": "capital of france"}}
    # the policy decision came first: the hit follows a durable allow
    decided = next(e for e in events if e["type"] == "PolicyDecided" and e["step_id"] == "lookup")
    assert decided["data"]["decision"] == "allow" and decided["seq"] < hit["seq"]
    await harness.settled()
    assert [(c[0], c[1]) for c in calls].count((second, "lookup")) == 0, "the agent was not called for lookup"
    assert (second, "report") in [(c[0], c[1]) for c in calls], "downstream steps run as usual"

    other = await harness.trigger(wf, {"q": "capital of spain"})  # another key and job hash: no hit
    events = await harness.wait_end(other)
    assert "StepCacheHit" not in types(events) and (other, "lookup") in [(c[0], c[1]) for c in calls]


async def test_a_cache_hit_never_crosses_tenants(doubled: Harness) -> None:
    harness = doubled
    wf, topic = unique("cache-ten"), unique("t")
    await harness.apply(cached_workflow(wf, topic))
    in_a = dataclasses.replace(harness, tenant=unique("acme"))
    in_b = dataclasses.replace(harness, tenant=unique("globex"))
    calls_a: list[Any] = []
    calls_b: list[Any] = []
    await harness.start_worker(echo_worker(topic, calls_a, tenant=in_a.tenant))
    await harness.start_worker(echo_worker(topic, calls_b, tenant=in_b.tenant))
    _, job_hash = await first_run(in_a, wf, calls_a)

    run_b = await in_b.trigger(wf, {"q": "capital of france"})
    events = await in_b.wait_end(run_b)
    assert types(events)[-1] == "RunSucceeded"
    ready = next(e for e in events if e["type"] == "StepReady" and e["step_id"] == "lookup")
    assert ready["data"]["job_hash"] == job_hash, "the same job in both tenants: only the tenant tells them apart"
    assert "StepCacheHit" not in types(events)
    assert [c[1] for c in calls_b] == ["lookup", "report"], "tenant B's own agent did the job"
    entries_b = await until(lambda: cache_entries(harness, in_b.tenant, job_hash), "tenant B's entry")
    assert [e.tenant for e in entries_b] == [in_b.tenant]
    assert [e.tenant for e in await cache_entries(harness, in_a.tenant, job_hash)] == [in_a.tenant]


async def test_a_policy_deny_wins_over_a_cached_output(doubled: Harness, bundles: Bundles) -> None:
    harness = doubled
    wf, topic = unique("cache-deny"), unique("t")
    await harness.apply(cached_workflow(wf, topic))
    calls: list[Any] = []
    await harness.start_worker(echo_worker(topic, calls))
    await first_run(harness, wf, calls)

    rule = f"no-{topic}"
    await bundles.publish(with_rules(f"""
@id("{rule}")
@reason("{topic} is switched off")
forbid(principal, action == Action::"dispatch", resource) when {{ resource.topic == "{topic}" }};
"""))
    second = await harness.trigger(wf, {"q": "capital of france"})
    events = await harness.wait_end(second)
    assert types(events)[-1] == "RunDenied"
    decided = next(e for e in events if e["type"] == "PolicyDecided" and e["step_id"] == "lookup")
    assert (decided["data"]["decision"], decided["data"]["rule_ids"]) == ("deny", [rule])
    await harness.settled()
    events = await harness.events(second)
    assert "StepCacheHit" not in types(events) and "StepSucceeded" not in types(events, "lookup")
    assert [c for c in calls if c[0] == second] == []


@pytest.mark.parametrize("who", ["operator", "worker", "planner"])
async def test_only_the_dispatcher_writes_the_result_cache(harness: Harness, principals: Principals,
                                                           who: str) -> None:
    """Nobody but the dispatcher (and admin) may put an entry: a person, a worker or another service
    that could would plant outputs for jobs that never ran."""
    creds = {"operator": lambda: principals.person("operator", harness.tenant),
             "worker": lambda: principals.worker(["t.any"], harness.tenant),
             "planner": lambda: principals.service("planner")}[who]()
    session = await watched(harness.url, creds)
    subject = p.kv_key(s.CACHE_BUCKET, s.cache_entry_key(harness.tenant, "0" * 64))
    try:
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await session.nc.jetstream(timeout=1.0).publish(subject, b"{}")
        assert permission_violation(await session.violation()) == ("publish", subject.lower())
    finally:
        await session.nc.close()
