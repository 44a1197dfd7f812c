"""The planner's rules without NATS: ready steps, conditions, fan-out, compensation and the run's end."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from interlock.contracts import events as ev
from interlock.contracts.messages import JobError
from interlock.core import codec
from interlock.core.run import Run
from interlock.core.steps import (
    COMPENSATE_SUFFIX,
    base_step_id,
    compensation_id,
    is_workflow_step,
    item_id,
    output_schema_error,
    template_context,
)
from interlock.core.workflow import Workflow
from interlock.planner.logic import Spill, plan
from tests.unit.run_builders import advance, appended, decide, start, started_run, types, workflow


def finish(run: Run, wf: Workflow, step_id: str, output: Any = None, *, ok: bool = True) -> None:
    """Take a ready job step through policy and one attempt to success (or a final failure)."""
    decide(run, step_id)
    state = run.steps[step_id]
    run.dispatch_step(ev.StepDispatched(step_id=step_id, attempt=1, job_id=f"{run.run_id}:{step_id}@1",
                                        topic=state.topic or ""))
    if ok:
        run.succeed_step(ev.StepSucceeded(step_id=step_id, attempt=1, output=output))
    else:
        run.fail_step(ev.StepFailed(step_id=step_id, attempt=1, final=True,
                                    error=JobError(message="boom", retryable=False)))
    advance(run, wf)


def statuses(run: Run) -> dict[str, str]:
    return {sid: st.status for sid, st in run.steps.items()}


def test_step_id_grammar() -> None:
    assert item_id("fan", 3) == "fan[3]" and base_step_id("fan[3]") == "fan"
    assert compensation_id("charge") == "charge" + COMPENSATE_SUFFIX
    assert base_step_id(compensation_id("charge")) == "charge" and base_step_id("plain") == "plain"
    assert is_workflow_step("charge") and not is_workflow_step("fan[0]")
    assert not is_workflow_step(compensation_id("charge"))


def test_output_schema_error_names_where() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert output_schema_error({"n": 1}, schema) is None and output_schema_error("anything", None) is None
    assert output_schema_error({"n": "x"}, schema) == "at n: 'x' is not of type 'integer'"


def test_roots_are_ready_and_dependents_wait_for_them() -> None:
    wf = workflow(a={"topic": "t.a", "input": {"x": "{{ input.x }}"}},
                  b={"topic": "t.b", "depends_on": "a", "input": {"got": "{{ steps.a.output.y }}"}})
    run = started_run(wf, {"x": 4})
    assert types(run) == [ev.RunStarted.type_name, ev.StepReady.type_name]
    a = run.steps["a"]
    assert (a.status, a.topic, a.input, a.step_type) == ("ready", "t.a", {"x": 4}, "job")
    assert a.job_hash == codec.job_hash(workflow_id="wf", workflow_version="1", step_id="a", topic="t.a",
                                        input={"x": 4})
    advance(run, wf)  # planning again decides nothing new
    assert types(run) == []
    finish(run, wf, "a", {"y": "yes"})
    assert run.steps["b"].status == "ready" and run.steps["b"].input == {"got": "yes"}


def test_a_job_step_without_input_gets_the_run_input() -> None:
    wf = workflow(a={"topic": "t.a"}, b={"topic": "t.b", "input": None})
    run = started_run(wf, {"x": 4})
    a, b = run.steps["a"], run.steps["b"]
    assert (a.input, b.input) == ({"x": 4}, None)  # an explicit `input: null` stays null
    assert a.job_hash == codec.job_hash(workflow_id="wf", workflow_version="1", step_id="a", topic="t.a",
                                        input={"x": 4})
    again = started_run(wf, {"x": 4})
    assert again.steps["a"].job_hash == a.job_hash  # deterministic: same run input, same hash


def test_template_context_reads_workflow_steps_only() -> None:
    wf = workflow(fan={"topic": "t.f", "for_each": "{{ [1] }}"})
    run = started_run(wf, {"k": 1})
    context = template_context(run, {"fan": "resolved"}, run.input)
    assert context["input"] == {"k": 1} and list(context["steps"]) == ["fan"]
    assert context["steps"]["fan"] == {"output": "resolved", "status": "expanded"}
    assert context["run"] == {"id": run.run_id, "tenant": run.tenant, "workflow": "wf"}


def test_a_false_condition_skips_and_skips_propagate() -> None:
    wf = workflow(a={"topic": "t.a", "when": "{{ input.go }}"},
                  b={"topic": "t.b", "depends_on": "a"},
                  c={"topic": "t.c", "when": "{{ not input.go }}"},
                  d={"topic": "t.d", "depends_on": ["b", "c"]})
    run = started_run(wf, {"go": False})
    assert statuses(run) == {"a": "skipped", "b": "skipped", "c": "ready"}
    assert [d.reason for d in appended(run) if isinstance(d, ev.StepSkipped)] == [
        "condition is false: {{ input.go }}", "every dependency was skipped"]
    finish(run, wf, "c")
    # d depends on a skipped and a succeeded step: it runs
    assert run.steps["d"].status == "ready"


def test_for_each_respects_max_parallel_and_collects_outputs() -> None:
    wf = workflow(fan={"topic": "t.f", "for_each": "{{ input.things }}", "max_parallel": 2,
                       "input": {"item": "{{ item }}", "i": "{{ index }}"}},
                  after={"topic": "t.z", "depends_on": "fan", "input": "{{ steps.fan.output }}"})
    run = started_run(wf, {"things": ["x", "y", "z"]})
    assert statuses(run) == {"fan": "expanded", "fan[0]": "ready", "fan[1]": "ready"}
    assert run.steps["fan"].item_count == 3
    assert run.steps["fan[1]"].input == {"item": "y", "i": 1} and run.steps["fan[1]"].parent_id == "fan"
    finish(run, wf, "fan[0]", "X")
    assert run.steps["fan[2]"].status == "ready"  # a slot freed up
    finish(run, wf, "fan[1]", "Y")
    assert run.steps["fan"].status == "expanded"
    finish(run, wf, "fan[2]", "Z")
    assert run.steps["fan"].status == "succeeded" and run.steps["fan"].output == ["X", "Y", "Z"]
    assert run.steps["after"].input == ["X", "Y", "Z"]


def test_a_failed_item_fails_the_parent_once_the_others_finish() -> None:
    wf = workflow(fan={"topic": "t.f", "for_each": "{{ [1, 2] }}"})
    run = started_run(wf)
    finish(run, wf, "fan[0]", ok=False)
    assert run.steps["fan"].status == "expanded"  # fan[1] still runs
    finish(run, wf, "fan[1]")
    fan = run.steps["fan"]
    assert fan.status == "failed" and fan.error is not None
    assert fan.error.message == "1 of 2 items failed: fan[0]"
    assert run.status == "failed" and run.reason == "step fan failed: 1 of 2 items failed: fan[0]"


def test_run_ends_with_the_sinks_outputs() -> None:
    wf = workflow(a={"topic": "t.a"}, b={"topic": "t.b", "depends_on": "a"}, c={"topic": "t.c", "depends_on": "a"})
    run = started_run(wf)
    finish(run, wf, "a", 1)
    finish(run, wf, "b", 2)
    assert run.status == "running"
    finish(run, wf, "c", 3)
    assert run.status == "succeeded" and run.result == {"b": 2, "c": 3}


def test_a_failure_fails_the_run_unless_the_step_may_fail() -> None:
    wf = workflow(a={"topic": "t.a"}, b={"topic": "t.b", "depends_on": "a"})
    run = started_run(wf)
    finish(run, wf, "a", ok=False)
    assert run.status == "failed" and run.reason == "step a failed: boom" and "b" not in run.steps
    tolerant = workflow(a={"topic": "t.a", "on_error": "continue"}, b={"topic": "t.b", "depends_on": "a"})
    run = started_run(tolerant)
    finish(run, tolerant, "a", ok=False)
    assert run.status == "running" and run.steps["b"].status == "ready"


def test_compensation_undoes_the_latest_first_then_fails_the_run() -> None:
    wf = workflow(a={"topic": "t.a", "compensate": "t.undo_a"},
                  b={"topic": "t.b", "depends_on": "a", "compensate": "t.undo_b"},
                  c={"topic": "t.c", "depends_on": "b", "on_error": "compensate"})
    run = started_run(wf, {"order": 7})
    finish(run, wf, "a", {"id": "A"})
    finish(run, wf, "b", {"id": "B"})
    run.collect_events()
    finish(run, wf, "c", ok=False)
    started = [d for d in appended(run) if isinstance(d, ev.CompensationStarted)]
    assert [(d.failed_step, d.steps) for d in started] == [("c", ["b", "a"])]
    undo_b = run.steps[compensation_id("b")]
    assert (undo_b.topic, undo_b.compensation_of, undo_b.step_type) == ("t.undo_b", "b", "job")
    # b names no input, so it received the run's input; its compensation sees the same.
    assert undo_b.input == {"step": "b", "input": {"order": 7}, "output": {"id": "B"}}
    assert compensation_id("a") not in run.steps  # one at a time
    finish(run, wf, compensation_id("b"))
    assert run.steps[compensation_id("a")].status == "ready"
    finish(run, wf, compensation_id("a"))
    assert run.status == "failed" and run.reason == "step c failed: boom (compensated)"


def test_a_failed_compensation_is_reported() -> None:
    wf = workflow(a={"topic": "t.a", "compensate": "t.undo_a"},
                  b={"topic": "t.b", "depends_on": "a", "on_error": "compensate"})
    run = started_run(wf)
    finish(run, wf, "a")
    finish(run, wf, "b", ok=False)
    finish(run, wf, compensation_id("a"), ok=False)
    assert run.status == "failed" and run.reason == "step b failed: boom (compensation failed for a)"


def test_bad_input_fails_the_step_at_once() -> None:
    wf = workflow(a={"topic": "t.a", "input": {"n": "{{ input.n }}"},
                     "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}}},
                  b={"topic": "t.b", "input": "{{ input.missing.deeper }}"})
    run = started_run(wf, {"n": "seven"})
    a, b = run.steps["a"], run.steps["b"]
    assert a.status == "failed" and a.error is not None and a.error.kind == "input_schema"
    assert a.error.message == "input does not match input_schema: at n: 'seven' is not of type 'integer'"
    assert b.status == "failed" and b.error is not None and b.error.kind == "template"


def test_reused_outputs_succeed_without_a_job() -> None:
    wf = workflow(a={"topic": "t.a"}, b={"topic": "t.b", "depends_on": "a", "input": "{{ steps.a.output }}"})
    run = advance(start(wf, reused_outputs={"a": {"kept": True}}), wf)
    assert run.steps["a"].status == "succeeded" and run.steps["a"].output == {"kept": True}
    assert run.steps["b"].input == {"kept": True}


def test_large_inputs_are_spilled_by_reference() -> None:
    wf = workflow(a={"topic": "t.a", "input": "{{ input.blob }}"}, b={"topic": "t.b", "input": "small"})
    run = start(wf, {"blob": "x" * 500})
    spill = Spill(inline_limit=100)
    plan(run, wf, {}, run.input, datetime.now(UTC), spill)
    a, b = run.steps["a"], run.steps["b"]
    assert a.input is None and a.input_ref is not None and b.input == "small" and b.input_ref is None
    assert spill.uploads == {a.input_ref.sha256: codec.canonical_json("x" * 500)}
    # the job hash is of the value, not of the reference
    assert a.job_hash == codec.job_hash(workflow_id="wf", workflow_version="1", step_id="a", topic="t.a",
                                        input="x" * 500)
