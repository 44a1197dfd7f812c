"""A person's interventions and feedback (issue 17) as pure rules over the Run and its Workflow:
what each appends, what each refuses, and that the log replays to the same state."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from interlock.contracts import events as ev
from interlock.contracts.messages import FeedbackRequest, JobError, RetryStepRequest, RunControlRequest, SkipStepRequest
from interlock.core.codec import canonical_json, envelope_from_event, job_hash, sha256_hex
from interlock.core.run import IllegalTransition, Run
from interlock.core.verify import verify_envelopes
from interlock.dispatcher import rules as dispatcher_rules
from interlock.planner import intervene
from interlock.planner.intervene import Refusal
from tests.unit.run_builders import advance, appended, decide, started_run, types, workflow
from tests.unit.test_run_aggregate import replay, state

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def chain(run: Run, envelopes: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The run's pending events appended to ``envelopes`` as a hash chain (what the store does)."""
    envelopes = [] if envelopes is None else envelopes
    prev = envelopes[-1]["hash"] if envelopes else ev.GENESIS_HASH
    for domain_event in run.collect_events():
        envelopes.append(envelope_from_event(domain_event, tenant=run.tenant, service="unit", prev_hash=prev))
        prev = envelopes[-1]["hash"]
    return envelopes


def assert_replays(run: Run, envelopes: list[dict[str, Any]]) -> None:
    assert state(replay(envelopes)) == state(run)
    report = verify_envelopes(envelopes)
    assert report.ok, report.problems


def two_steps(**a: Any) -> Any:
    return workflow(a={"topic": "t.a", "input": {"n": "{{ input.n }}"}, **a},
                    b={"topic": "t.b", "depends_on": ["a"], "input": {"v": "{{ steps.a.output.v }}"}})


def run_to(run: Run, step_id: str, *, fail: bool) -> None:
    """Policy allows ``step_id``, it is dispatched and its attempt succeeds (output ``{"v": 1}``) or
    fails for good."""
    decide(run, step_id)
    state = run.steps[step_id]
    attempt = state.attempt + 1
    run.dispatch_step(ev.StepDispatched(step_id=step_id, attempt=attempt, job_id=f"j:{step_id}@{attempt}",
                                        topic=state.topic or "t"))
    if fail:
        run.fail_step(ev.StepFailed(step_id=step_id, attempt=attempt, final=True,
                                    error=JobError(message="boom", retryable=False)))
    else:
        run.succeed_step(ev.StepSucceeded(step_id=step_id, attempt=attempt, output={"v": 1}))


def failed_at_a() -> tuple[Any, Run]:
    wf = two_steps()
    run = started_run(wf, {"n": 5})
    run_to(run, "a", fail=True)
    advance(run, wf)
    assert run.status == "failed"
    return wf, run


def act(kind: type[Any], **fields: Any) -> Any:
    return kind(run_id="r", reason=fields.pop("reason", "because"), **fields)


def test_resume_reopens_a_failed_run_and_retries_its_failed_step() -> None:
    wf, run = failed_at_a()
    log = chain(run)
    assert intervene.resume(run, wf, "olga", act(RunControlRequest, via="api:k1")) == ["a"]
    assert run.status == "running" and run.ended_at is None and run.reason == ""
    state = run.steps["a"]
    assert state.status == "ready" and state.decision is None and state.error is None and state.attempt == 1
    log = chain(run, log)
    assert [e["type"] for e in log[-2:]] == ["RunResumed", "StepRetryRequested"]
    assert log[-2]["data"] == {"by": "olga", "via": "api:k1", "reason": "because", "steps": ["a"]}
    assert_replays(run, log)
    # policy decides again; the next attempt is 2 (a job id never used before)
    run_to(run, "a", fail=False)
    assert run.steps["a"].attempt == 2
    advance(run, wf)
    assert run.steps["b"].input == {"v": 1}


@pytest.mark.parametrize("ending", ["succeeded", "cancelled", "timed_out", "denied"])
def test_only_a_failed_run_resumes(ending: str) -> None:
    run = started_run(two_steps(), {"n": 1})
    {"succeeded": lambda: None, "cancelled": lambda: run.cancel(ev.RunCancelled(by="x")),
     "timed_out": lambda: run.time_out(ev.RunTimedOut(timeout_ms=1)),
     "denied": lambda: run.deny(ev.RunDenied(step_id=None, reason="no"))}[ending]()
    if ending == "succeeded":
        with pytest.raises(Refusal, match="is running; only a failed run"):
            intervene.resume(run, two_steps(), "olga", act(RunControlRequest))
        return
    with pytest.raises(Refusal, match=f"is {ending}; only a failed run can be resumed"):
        intervene.resume(run, two_steps(), "olga", act(RunControlRequest))
    with pytest.raises(IllegalTransition, match="only a failed run"):
        run.resume(ev.RunResumed(by="olga", reason="r", steps=["a"]))


def test_a_compensated_run_does_not_resume() -> None:
    wf = workflow(a={"topic": "t.a", "compensate": "t.undo"},
                  b={"topic": "t.b", "depends_on": ["a"], "on_error": "compensate"})
    run = started_run(wf, {})
    run_to(run, "a", fail=False)
    advance(run, wf)
    run_to(run, "b", fail=True)
    advance(run, wf)
    run_to(run, "a~compensate", fail=False)
    advance(run, wf)
    assert run.status == "failed" and run.compensation is not None
    with pytest.raises(IllegalTransition, match="compensated"):
        run.resume(ev.RunResumed(by="olga", reason="r", steps=["b"]))


def test_patched_retry_gets_the_new_inputs_job_hash() -> None:
    wf, run = failed_at_a()
    old = run.steps["a"].job_hash
    appended(run)
    intervene.retry(run, wf, "olga", act(RetryStepRequest, step_id="a", patched=True, input={"n": 9}), {"n": 9})
    new = job_hash(workflow_id="wf", workflow_version="1", step_id="a", topic="t.a", input={"n": 9})
    assert run.steps["a"].job_hash == new != old and run.steps["a"].input == {"n": 9}
    retried = appended(run)[-1]
    assert isinstance(retried, ev.StepRetryRequested)
    assert (retried.patched, retried.input, retried.previous_job_hash, retried.by) == (True, {"n": 9}, old, "olga")


def test_retry_refusals() -> None:
    wf, run = failed_at_a()
    with pytest.raises(Refusal, match="a reason is required"):
        intervene.retry(run, wf, "olga", act(RetryStepRequest, step_id="a", reason="  "))
    with pytest.raises(Refusal, match="is not a step of workflow wf"):
        intervene.retry(run, wf, "olga", act(RetryStepRequest, step_id="zz"))
    with pytest.raises(Refusal, match="has not run yet"):
        intervene.retry(run, wf, "olga", act(RetryStepRequest, step_id="b"))
    schema = two_steps(input_schema={"type": "object", "required": ["n"]})
    with pytest.raises(Refusal, match="does not match its input_schema"):
        intervene.retry(run, schema, "olga", act(RetryStepRequest, step_id="a", patched=True, input={}), {})
    # a running run: a succeeded step is not retried
    ok = started_run(two_steps(), {"n": 1})
    run_to(ok, "a", fail=False)
    with pytest.raises(IllegalTransition, match="step is succeeded"):
        intervene.retry(ok, two_steps(), "olga", act(RetryStepRequest, step_id="a"))


def test_retry_of_one_step_of_a_run_that_failed_at_two_is_refused() -> None:
    wf = workflow(a={"topic": "t.a"}, b={"topic": "t.b"})
    run = started_run(wf, {})
    run_to(run, "a", fail=True)
    run_to(run, "b", fail=True)
    advance(run, wf)
    assert run.status == "failed"
    with pytest.raises(Refusal, match="also failed at b: resume the run"):
        intervene.retry(run, wf, "olga", act(RetryStepRequest, step_id="a"))
    assert sorted(intervene.resume(run, wf, "olga", act(RunControlRequest))) == ["a", "b"]


def test_skip_completes_the_step_and_downstream_proceeds() -> None:
    wf, run = failed_at_a()
    log = chain(run)
    intervene.skip(run, wf, "olga", act(SkipStepRequest, step_id="a", output={"v": 7}), {"v": 7}, None)
    advance(run, wf)
    assert run.status == "running" and run.steps["a"].status == "succeeded" and run.steps["b"].input == {"v": 7}
    log = chain(run, log)
    supplied = next(e for e in log if e["type"] == "StepOutputSupplied")["data"]
    assert supplied["output_hash"] == sha256_hex(canonical_json({"v": 7})) and supplied["previous_status"] == "failed"
    assert_replays(run, log)


def test_skip_refusals() -> None:
    wf = workflow(gate={"type": "approval", "approvers": "lead"}, fan={"topic": "t", "for_each": "{{ [1, 2] }}"},
                  c={"topic": "t", "output_schema": {"type": "object", "required": ["v"]}})
    run = started_run(wf, {})
    with pytest.raises(Refusal, match="for_each step: skip its items"):
        intervene.skip(run, wf, "olga", act(SkipStepRequest, step_id="fan", output=1), 1, None)
    with pytest.raises(Refusal, match="does not match its output_schema"):
        intervene.skip(run, wf, "olga", act(SkipStepRequest, step_id="c", output={}), {}, None)
    with pytest.raises(IllegalTransition, match="approval step cannot be skipped"):
        intervene.skip(run, wf, "olga", act(SkipStepRequest, step_id="gate", output={}), {}, None)
    denied = started_run(two_steps(), {"n": 1})
    decide(denied, "a", "deny")
    with pytest.raises(Refusal, match="denied by policy"):
        intervene.skip(denied, two_steps(), "olga", act(SkipStepRequest, step_id="a", output={}), {}, None)


def test_pause_holds_dispatching_until_unpaused() -> None:
    wf = two_steps()
    run = started_run(wf, {"n": 1})
    with pytest.raises(IllegalTransition, match="not paused"):
        intervene.unpause(run, "olga", act(RunControlRequest))
    intervene.pause(run, "olga", act(RunControlRequest))
    decide(run, "a")
    assert run.paused and dispatcher_rules.dispatch(run, wf, NOW) == []
    assert run.steps["a"].status == "released"
    with pytest.raises(IllegalTransition, match="already paused"):
        intervene.pause(run, "olga", act(RunControlRequest))
    intervene.unpause(run, "olga", act(RunControlRequest))
    assert [type(e).__name__ for e in dispatcher_rules.dispatch(run, wf, NOW)] == ["PublishJob"]
    assert types(run)[-2:] == ["RunUnpaused", "StepDispatched"]


def test_feedback_is_bound_to_the_output_hash_and_allowed_after_the_end() -> None:
    wf = workflow(a={"topic": "t.a"})
    run = started_run(wf, {})
    with pytest.raises(Refusal, match="it has no output to rate"):
        intervene.feedback(run, "olga", FeedbackRequest(run_id="r", step_id="a", score=1))
    run_to(run, "a", fail=False)
    advance(run, wf)
    assert run.status == "succeeded"
    digest = sha256_hex(canonical_json({"v": 1}))
    with pytest.raises(Refusal, match="needs a score, a correction or a note"):
        intervene.feedback(run, "olga", FeedbackRequest(run_id="r", step_id="a"))
    with pytest.raises(Refusal, match="changed since you looked"):
        intervene.feedback(run, "olga", FeedbackRequest(run_id="r", step_id="a", score=1, output_hash="0" * 64))
    given = intervene.feedback(run, "olga", FeedbackRequest(run_id="r", step_id="a", has_correction=True,
                                                            correction=None, output_hash=digest))
    assert (given.output_hash, given.attempt, given.by, given.correction) == (digest, 1, "olga", None)
    assert run.status == "succeeded"


def test_a_retried_item_reopens_its_failed_for_each_parent() -> None:
    wf = workflow(fan={"topic": "t", "for_each": "{{ [1, 2] }}"})
    run = started_run(wf, {})
    run_to(run, "fan[0]", fail=False)
    run_to(run, "fan[1]", fail=True)
    advance(run, wf)
    assert run.status == "failed" and run.steps["fan"].status == "failed"
    assert intervene.resume(run, wf, "olga", act(RunControlRequest)) == ["fan[1]"]
    assert run.steps["fan"].status == "expanded"
    run_to(run, "fan[1]", fail=False)
    advance(run, wf)
    assert run.status == "succeeded"
