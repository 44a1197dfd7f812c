"""Run diff and failure grouping (core/rundiff.py) and the result cache's rules, with no I/O."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from interlock.contracts import events as ev
from interlock.contracts.messages import CacheEntry, JobError
from interlock.core import codec
from interlock.core.run import Run
from interlock.core.rundiff import diff_runs, group_failures, shown, since_time
from interlock.core.workflow import Workflow, WorkflowInvalid, parse_workflow
from interlock.dispatcher import cache, rules
from tests.unit.run_builders import TENANT, advance, appended, decide, start

NOW = datetime(2026, 12, 2, 4, 0, tzinfo=UTC)


def two_steps(**extra: Any) -> Workflow:
    return parse_workflow({"id": "wf", "version": 1, "steps": {
        "a": {"topic": "t.a", "input": {"n": "{{ input.n }}"}, **extra},
        "b": {"topic": "t.b", "depends_on": ["a"], "input": {"fixed": 1}},
    }})


def finish(wf: Workflow, run: Run, *, fail_b: str | None = None, tenant: str = TENANT) -> Run:
    """Decide, dispatch and complete every step in order (the planner in between)."""
    advance(run, wf)
    while not run.terminal:
        for sid, state in list(run.steps.items()):
            if state.status == "ready":
                decide(run, sid)
        rules.dispatch(run, wf, NOW)
        for sid, state in list(run.steps.items()):
            if state.status == "dispatched":
                if sid == "b" and fail_b:
                    run.fail_step(ev.StepFailed(step_id=sid, attempt=1, final=True,
                                                error=JobError(message=fail_b, retryable=False)))
                else:
                    run.succeed_step(ev.StepSucceeded(step_id=sid, attempt=1, output={"got": state.input}))
        advance(run, wf)
    return run


def log_of(run: Run) -> list[dict[str, Any]]:
    envelopes: list[dict[str, Any]] = []
    prev = ev.GENESIS_HASH
    for event in run.collect_events():
        envelope = codec.envelope_from_event(event, tenant=run.tenant, service="test", prev_hash=prev)
        envelopes.append(envelope)
        prev = envelope["hash"]
    return envelopes


def test_diff_marks_the_first_step_that_differs_and_only_it() -> None:
    wf = two_steps()
    a = log_of(finish(wf, start(wf, {"n": 1})))
    b = log_of(finish(wf, start(wf, {"n": 2})))
    doc = diff_runs(a, b).as_dict()
    assert doc["first_divergence"] == {"step_id": "a", "fields": ["input", "output"]}
    assert [(d["step_id"], d["differs"], d["first_divergence"]) for d in doc["steps"]] == [
        ("a", ["input", "output"], True), ("b", [], False)]
    assert doc["run_differs"] == ["input"]
    assert doc["steps"][0]["a"]["rules"] == ["r1"] and doc["steps"][0]["a"]["decision"] == "allow"


def test_diff_of_a_run_with_itself_finds_no_divergence_and_a_failure_is_one() -> None:
    wf = two_steps()
    a = log_of(finish(wf, start(wf, {"n": 1})))
    assert diff_runs(a, a).first_divergence is None
    broken = log_of(finish(wf, start(wf, {"n": 1}), fail_b="disk full"))
    first = diff_runs(a, broken).first_divergence
    assert first is not None and first.step_id == "b" and first.differs == ["status", "output", "error"]
    assert first.b is not None and first.b.error == "[error] disk full"


def test_a_step_only_one_run_has_is_aligned_and_marked() -> None:
    wf = two_steps()
    done = log_of(finish(wf, start(wf, {"n": 1})))
    partial = start(wf, {"n": 1})
    advance(partial, wf)
    diff = diff_runs(done, log_of(partial))
    assert [(d.step_id, d.differs) for d in diff.steps][1] == ("b", ["missing in b"])


def test_sensitive_values_are_shown_redacted_never_in_clear() -> None:
    sealed = {"$sealed": {"v": 1, "alg": "AES-256-GCM", "kid": "k", "tenant": "t", "run": "r", "nonce": "x",
                          "ct": "y"}}
    assert shown({"user": "ann", "password": "hunter2", "key": sealed}) == {
        "user": "ann", "password": "[sensitive]", "key": "[sensitive]"}
    assert shown({"nested": [{"api_key": "k-123"}]}) == {"nested": [{"api_key": "[sensitive]"}]}


def test_failures_group_by_step_and_error_most_frequent_first() -> None:
    rows: list[dict[str, Any]] = [
        {"run_id": "r1", "started_at": "2026-12-01T10:00:00+00:00", "step_id": "fetch", "error": "timeout"},
        {"run_id": "r2", "started_at": "2026-12-01T11:00:00+00:00", "step_id": "apply", "error": "denied by api"},
        {"run_id": "r3", "started_at": "2026-12-01T12:00:00+00:00", "step_id": "fetch", "error": "timeout"},
        {"run_id": "r4", "started_at": "2026-12-01T13:00:00+00:00", "step_id": None, "reason": "budget exceeded"},
    ]
    groups = [g.as_dict() for g in group_failures(rows)]
    assert [(g["step_id"], g["error"], g["runs"], g["run_ids"]) for g in groups] == [
        ("fetch", "timeout", 2, ["r3", "r1"]), ("(run)", "budget exceeded", 1, ["r4"]),
        ("apply", "denied by api", 1, ["r2"])]
    assert (groups[0]["first_at"], groups[0]["last_at"]) == ("2026-12-01T10:00:00+00:00", "2026-12-01T12:00:00+00:00")


def test_since_takes_a_duration_or_a_time() -> None:
    assert since_time("7d", NOW) == NOW - timedelta(days=7)
    assert since_time("2026-12-01T00:00:00", NOW) == datetime(2026, 12, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither a duration"):
        since_time("a week", NOW)


# -- result cache: the workflow field ------------------------------------------------------------
@pytest.mark.parametrize(("cache_spec", "problem"), [
    ({"key": "{{ input.n }}", "ttl": "1 hour"}, "steps.a.cache.ttl: invalid duration '1 hour'"),
    ({"key": "{{ input.n }}", "ttl": "90d"}, "steps.a.cache.ttl: ttl '90d' must be between 1s and 30d"),
    ({"key": "{{ inptu.n }}", "ttl": "1h"}, "steps.a.cache.key: unknown variable 'inptu'"),
    ({"key": "{{ input.n }}"}, "steps.a.cache: missing required field 'ttl'"),
    ({"key": "x", "ttl": "1h", "tll": 3}, "steps.a.cache: unknown field 'tll' (did you mean 'ttl'?)"),
])
def test_a_bad_cache_is_refused_naming_its_yaml_path(cache_spec: dict[str, Any], problem: str) -> None:
    with pytest.raises(WorkflowInvalid, match=re.escape(problem)):
        two_steps(cache=cache_spec)


def test_cache_leaves_the_definition_hash_of_workflows_without_it() -> None:
    assert two_steps().content_hash != two_steps(cache={"key": "x", "ttl": "1h"}).content_hash
    assert two_steps(cache={"key": "x", "ttl": "1h"}).steps["a"].cache.ttl_ms == 3_600_000  # type: ignore[union-attr]


# -- result cache: the dispatcher's rules -------------------------------------------------------
def released_run(wf: Workflow, tenant: str = TENANT, decision: ev.Decision = "allow") -> Run:
    run = Run.start(uuid.uuid4(), ev.RunStarted(workflow_id=wf.id, workflow_version=wf.version,
                                                 definition_hash=wf.content_hash, input={"n": 7},
                                                 idempotency_key=uuid.uuid4().hex, tenant=tenant))
    advance(run, wf)
    decide(run, "a", decision)
    return run


def entry_of(run: Run, wf: Workflow, **changes: Any) -> CacheEntry:
    (lookup,) = cache.lookups(run, wf)
    entry = CacheEntry(tenant=run.tenant, workflow_id=wf.id, step_id="a", run_id="source-run", source_step_id="a",
                       job_hash=lookup.job_hash, cache_key=lookup.cache_key, output={"cached": True},
                       stored_at=NOW, expires_at=NOW + timedelta(hours=1))
    return entry.model_copy(update=changes)


def test_a_usable_entry_records_the_hit_and_the_success_instead_of_a_dispatch() -> None:
    wf = two_steps(cache={"key": "{{ input.n }}", "ttl": "1h"})
    run = released_run(wf)
    run.collect_events()
    (lookup,) = cache.lookups(run, wf)
    entry = entry_of(run, wf)
    assert cache.usable(entry, run, lookup, NOW)
    cache.use(run, lookup, entry)
    hit, succeeded = appended(run)
    assert isinstance(hit, ev.StepCacheHit) and (hit.source_run_id, hit.source_step_id) == ("source-run", "a")
    assert isinstance(succeeded, ev.StepSucceeded) and (succeeded.attempt, succeeded.worker) == (0, "cache")
    assert run.steps["a"].status == "succeeded" and run.steps["a"].output == {"cached": True}
    assert rules.dispatch(run, wf, NOW) == [], "nothing left to dispatch"


def test_an_entry_of_another_tenant_job_hash_or_key_or_an_expired_one_is_never_used() -> None:
    wf = two_steps(cache={"key": "{{ input.n }}", "ttl": "1h"})
    run = released_run(wf)
    (lookup,) = cache.lookups(run, wf)
    assert lookup.entry_key.startswith(f"{TENANT}.")
    assert not cache.usable(entry_of(run, wf, tenant="other"), run, lookup, NOW)
    assert not cache.usable(entry_of(run, wf, job_hash="f" * 64), run, lookup, NOW)
    assert not cache.usable(entry_of(run, wf, cache_key="0" * 64), run, lookup, NOW)
    assert not cache.usable(entry_of(run, wf), run, lookup, NOW + timedelta(hours=2))
    other_tenant = released_run(wf, tenant="other")
    (theirs,) = cache.lookups(other_tenant, wf)
    assert theirs.job_hash == lookup.job_hash and theirs.entry_key != lookup.entry_key


def test_no_lookup_before_an_allow_nor_for_a_denied_or_uncached_step() -> None:
    cached = two_steps(cache={"key": "{{ input.n }}", "ttl": "1h"})
    assert cache.lookups(released_run(cached, decision="deny"), cached) == []
    assert cache.lookups(released_run(cached, decision="require_approval"), cached) == []
    ready = Run.start(uuid.uuid4(), ev.RunStarted(workflow_id="wf", workflow_version="1", definition_hash="",
                                                   input={"n": 7}, idempotency_key="k", tenant=TENANT))
    advance(ready, cached)
    assert cache.lookups(ready, cached) == [], "no decision yet"
    assert cache.lookups(released_run(two_steps()), two_steps()) == []


def test_a_job_that_succeeded_is_stored_once_its_outcome_is_in_the_run() -> None:
    wf = two_steps(cache={"key": "{{ input.n }}", "ttl": "30m"})
    run = released_run(wf)
    assert cache.entry_for(run, wf, "a", NOW) is None, "not run yet"
    rules.dispatch(run, wf, NOW)
    run.succeed_step(ev.StepSucceeded(step_id="a", attempt=1, output={"v": 1}))
    found = cache.entry_for(run, wf, "a", NOW)
    assert found is not None
    key, entry = found
    (lookup,) = cache.lookups(released_run(wf), wf)
    assert key == lookup.entry_key and entry.expires_at == NOW + timedelta(minutes=30)
    assert (entry.tenant, entry.run_id, entry.output) == (TENANT, run.run_id, {"v": 1})


class _NoBucket:
    """A JetStream context whose cache bucket cannot be reached."""

    async def key_value(self, bucket: str) -> Any:
        raise TimeoutError(f"no answer for {bucket}")


async def test_a_cache_that_cannot_be_read_answers_nothing_and_the_job_is_dispatched() -> None:
    wf = two_steps(cache={"key": "{{ input.n }}", "ttl": "1h"})
    run = released_run(wf)
    run.collect_events()
    result_cache = cache.ResultCache(cast(Any, _NoBucket()))
    assert await result_cache.use_cached(run, wf, NOW) == []
    assert appended(run) == [] and run.steps["a"].status == "released"
    assert [type(e).__name__ for e in rules.dispatch(run, wf, NOW)] == ["PublishJob"]
    rules_run = released_run(wf)
    rules.dispatch(rules_run, wf, NOW)
    rules_run.succeed_step(ev.StepSucceeded(step_id="a", attempt=1, output={"v": 1}))
    assert await result_cache.remember(rules_run, wf, "a", NOW) is False, "a failed write is only logged"
