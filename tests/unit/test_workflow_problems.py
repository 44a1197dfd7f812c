"""Validation problems: every kind, with location and YAML line, all reported at once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from interlock.core.workflow import Problem, WorkflowInvalid, format_problems, load_workflow, parse_workflow

DATA = Path(__file__).parent / "data" / "workflows"

HEADER = "id: wf\nversion: 1\nsteps:\n"  # steps start on line 4


def problems_of(yaml_text: str) -> list[Problem]:
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow(yaml_text)
    return info.value.problems


def steps_problems(steps_yaml: str) -> list[Problem]:
    return problems_of(HEADER + textwrap.indent(textwrap.dedent(steps_yaml).lstrip("\n"), "  "))


def triples(problems: list[Problem]) -> list[tuple[str, str, int | None]]:
    return [(p.location, p.message, p.line) for p in problems]


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, triples(problems)
    return problems[0]


# --- YAML level ------------------------------------------------------------------------------


def test_yaml_syntax_error_has_line() -> None:
    problem = only(problems_of("id: wf\nversion: 1\nsteps:\n  a: {topic: [x\n"))
    assert problem.message.startswith("invalid YAML:")
    assert problem.line is not None and problem.line >= 4


def test_empty_document() -> None:
    assert only(problems_of("")).message == "the workflow is empty"


def test_top_level_must_be_a_mapping() -> None:
    problem = only(problems_of("- a\n- b\n"))
    assert problem.message == "a workflow must be a mapping, not a list"


def test_parse_workflow_rejects_non_mapping() -> None:
    with pytest.raises(WorkflowInvalid, match="must be a mapping"):
        parse_workflow(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_duplicate_keys_are_reported() -> None:
    problem = only(steps_problems("a:\n  topic: t.a\n  topic: t.b\n"))
    assert (problem.location, problem.message, problem.line) == ("steps.a.topic", "duplicate key", 6)


def test_unreadable_file() -> None:
    with pytest.raises(WorkflowInvalid, match="cannot read workflow") as info:
        load_workflow(DATA / "does-not-exist.yaml")
    assert "does-not-exist.yaml" in str(info.value)


# --- fields ----------------------------------------------------------------------------------


def test_missing_required_fields() -> None:
    assert triples(problems_of("id: wf\n")) == [
        ("", "missing required field 'version'", 1),
        ("", "missing required field 'steps'", 1),
    ]


def test_unknown_field_points_at_the_key_and_suggests() -> None:
    problem = only(steps_problems("a: {topic: t}\nb:\n  topic: t\n  dependz_on: [a]\n"))
    assert problem.location == "steps.b"
    assert problem.message == "unknown field 'dependz_on' (did you mean 'depends_on'?)"
    assert problem.line == 7


def test_unknown_retry_field() -> None:
    problem = only(steps_problems("a:\n  topic: t\n  retries: {max_attempts: 2, backof_ms: 5}\n"))
    assert problem.location == "steps.a.retries"
    assert "unknown field 'backof_ms'" in problem.message


def test_mistyped_fields() -> None:
    problems = steps_problems(
        """
        a:
          topic: t
          timeout_ms: -5
          depends_on: 3
          retries: {max_attempts: 0}
          labels: {risk: 1}
        """
    )
    assert triples(problems) == [
        ("steps.a.timeout_ms", "should be greater than 0 (got -5)", 6),
        ("steps.a.depends_on", "expected a list, got int", 7),
        ("steps.a.retries.max_attempts", "should be greater than or equal to 1 (got 0)", 8),
        ("steps.a.labels.risk", "should be a valid string (got 1)", 9),
    ]


def test_float_version_must_be_quoted() -> None:
    problem = only(problems_of("id: wf\nversion: 1.10\nsteps: {a: {topic: t}}\n"))
    assert problem.location == "version"
    assert "quote it" in problem.message


def test_bad_workflow_id_and_trigger() -> None:
    problems = problems_of("id: My.Flow\nversion: 1\ntriggers: ['a b', 'x.>.y']\nsteps: {a: {topic: t}}\n")
    assert [(p.location, p.line) for p in problems] == [("id", 1), ("triggers[0]", 3), ("triggers[1]", 3)]


def test_invalid_step_ids() -> None:
    problems = steps_problems("a.b: {topic: t}\n1st: {topic: t}\n'yes': {topic: t}\nyes: {topic: t}\n")
    assert triples(problems) == [
        (
            "steps['a.b']",
            "invalid step id 'a.b': start with a letter, then letters, digits, '_' or '-' (no dots)",
            4,
        ),
        (
            "steps['1st']",
            "invalid step id '1st': start with a letter, then letters, digits, '_' or '-' (no dots)",
            5,
        ),
        (
            "steps[True]",
            "key must be a string, got True (YAML reads yes/no/on/off/true/false as booleans; quote it)",
            7,
        ),
    ]


def test_unknown_step_type_lists_allowed() -> None:
    problem = only(steps_problems("a: {type: jobb, topic: t}\n"))
    assert (problem.location, problem.line) == ("steps.a.type", 4)
    assert problem.message == "unknown step type 'jobb'; allowed: 'job', 'approval', 'notify', 'guardrail'"


def test_job_without_topic() -> None:
    assert triples(steps_problems("a:\n  input: {}\n")) == [("steps.a", "job step needs a 'topic'", 4)]


def test_invalid_topics() -> None:
    problems = steps_problems("a: {topic: 'incident.*'}\nb: {topic: t, compensate: 'undo it'}\n")
    assert [(p.location, p.line) for p in problems] == [("steps.a.topic", 4), ("steps.b.compensate", 5)]


def test_fields_of_other_step_types_are_rejected() -> None:
    problems = steps_problems(
        """
        gate: {type: approval, approvers: ops, topic: x, channel: c}
        tell: {type: notify, message: hi, approvers: ops}
        job: {topic: t, prompt: p}
        """
    )
    assert triples(problems) == [
        ("steps.gate.topic", "'topic' only applies to job steps", 4),
        ("steps.gate.channel", "'channel' only applies to notify steps", 4),
        ("steps.tell.approvers", "'approvers' only applies to approval steps", 5),
        ("steps.job.prompt", "'prompt' only applies to approval steps", 6),
    ]


def test_notify_without_message_is_accepted() -> None:
    workflow = load_workflow(HEADER + "  tell: {type: notify}\n")
    assert workflow.steps["tell"].message is None  # the dispatcher sends a run summary


def test_approval_needs_approvers() -> None:
    assert triples(steps_problems("gate: {type: approval}\n")) == [
        ("steps.gate", "approval step needs 'approvers' (the role allowed to decide)", 4)]


def test_version_must_hold_a_digit() -> None:
    problems = problems_of("id: wf\nversion: one\nsteps: {a: {topic: t}}\n")
    assert triples(problems) == [
        ("version", "invalid version 'one': letters, digits and . + _ - with at least one digit, "
                    "e.g. 1, 2024.1 or 1.0.0", 2)]
    assert load_workflow("id: wf\nversion: 1.0.0\nsteps: {a: {topic: t}}\n").version == "1.0.0"
    # a content hash is a version too (the drill names its workflows' versions so)
    assert load_workflow("id: wf\nversion: dbbe4d13ffe\nsteps: {a: {topic: t}}\n").version == "dbbe4d13ffe"


def test_unknown_filter_and_test_are_reported_with_their_line() -> None:
    problems = steps_problems(
        """
        a: {topic: t, input: {x: "{{ input.x | nosuchfilter }}"}}
        b: {topic: t, when: "input.x is nosuchtest"}
        c: {type: notify, message: "{{ input.x | uper }}"}
        """
    )
    assert triples(problems) == [
        ("steps.a.input.x", "unknown filter 'nosuchfilter' (in '{{ input.x | nosuchfilter }}')", 4),
        ("steps.b.when", "unknown test 'nosuchtest' (in 'input.x is nosuchtest')", 5),
        ("steps.c.message", "unknown filter 'uper' (did you mean 'upper'?) (in '{{ input.x | uper }}')", 6),
    ]


def test_non_utf8_file_is_one_problem_naming_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"id: wf\nversion: 1\nname: caf\xe9\nsteps: {a: {topic: t}}\n")
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow(path)
    assert str(info.value) == f"{path}:3: not UTF-8 text: invalid byte 0xe9 at byte offset 27"


def test_binary_file_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "blob.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow(path)
    assert str(info.value) == f"{path}: not a text file: NUL byte at byte offset 8"


def test_size_limit_is_checked_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"id: wf\nversion: 1\nsteps: {a: {topic: t}}\n#" + b"x" * (2 * 1024 * 1024))
    size = path.stat().st_size
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow(path)
    assert str(info.value) == (f"{path}: the workflow is {size} bytes, over the limit of 1048576 bytes "
                               f"(set INTERLOCK_WORKFLOW_MAX_BYTES to change it)")
    with pytest.raises(WorkflowInvalid, match="over the limit of 10 bytes"):
        load_workflow("id: wf\nversion: 1\nsteps: {a: {topic: t}}\n", max_bytes=10)  # text, as the registry gets it
    monkeypatch.setenv("INTERLOCK_WORKFLOW_MAX_BYTES", str(size))
    assert load_workflow(path).id == "wf"


def test_design_document_workflow_validates_as_written() -> None:
    path = DATA / "design_document.yaml"
    workflow = load_workflow(path)
    assert workflow.version == "1.0.0"
    assert workflow.steps["notify"].type == "notify" and workflow.steps["notify"].message is None


def test_max_parallel_needs_for_each() -> None:
    problem = only(steps_problems("a:\n  topic: t\n  max_parallel: 2\n"))
    assert (problem.location, problem.message, problem.line) == (
        "steps.a.max_parallel",
        "max_parallel needs for_each",
        6,
    )


def test_heartbeat_longer_than_timeout() -> None:
    problem = only(steps_problems("a: {topic: t, timeout_ms: 100, heartbeat_timeout_ms: 200}\n"))
    assert problem.location == "steps.a.heartbeat_timeout_ms"


def test_retry_base_above_cap() -> None:
    problem = only(steps_problems("a: {topic: t, retries: {backoff_ms: 90000}}\n"))
    assert problem.location == "steps.a.retries"
    assert problem.message == "backoff_ms (90000) must not exceed max_backoff_ms (60000)"


def test_invalid_json_schema() -> None:
    problem = only(steps_problems("a:\n  topic: t\n  output_schema: {type: objekt}\n"))
    assert problem.location == "steps.a.output_schema"
    assert problem.message.startswith("invalid JSON Schema")
    assert problem.line == 6


def test_input_must_be_json_like() -> None:
    problem = only(steps_problems("a:\n  topic: t\n  input: {when: 2024-01-01}\n"))
    assert problem.location == "steps.a.input"
    assert "date is not JSON-like" in problem.message


def test_empty_steps() -> None:
    assert triples(problems_of("id: wf\nversion: 1\nsteps: {}\n")) == [
        ("steps", "a workflow needs at least one step", 3)
    ]


# --- dependencies ----------------------------------------------------------------------------


def test_unknown_dependency_with_suggestion() -> None:
    problems = steps_problems("fetch: {topic: t}\nb:\n  topic: t\n  depends_on: [fetch, fetc, zzz]\n")
    assert triples(problems) == [
        ("steps.b.depends_on[1]", "unknown step 'fetc' (did you mean 'fetch'?)", 7),
        ("steps.b.depends_on[2]", "unknown step 'zzz'", 7),
    ]


def test_unknown_dependency_single_string_form() -> None:
    problem = only(steps_problems("b:\n  topic: t\n  depends_on: x\n"))
    assert (problem.location, problem.message, problem.line) == ("steps.b.depends_on", "unknown step 'x'", 6)


def test_self_and_duplicate_dependency() -> None:
    problems = steps_problems("a: {topic: t}\nb:\n  topic: t\n  depends_on:\n    - b\n    - a\n    - a\n")
    assert triples(problems) == [
        ("steps.b.depends_on[0]", "a step cannot depend on itself", 8),
        ("steps.b.depends_on[2]", "duplicate dependency 'a'", 10),
    ]


def test_cycle_is_named() -> None:
    problem = only(
        steps_problems(
            """
            a: {topic: t, depends_on: c}
            b: {topic: t, depends_on: a}
            c: {topic: t, depends_on: b}
            d: {topic: t, depends_on: c}
            """
        )
    )
    # "->" reads "depends on"; the cycle starts at its earliest-defined step.
    assert (problem.location, problem.message, problem.line) == (
        "steps.a.depends_on",
        "dependency cycle: a -> c -> b -> a",
        4,
    )


def test_each_distinct_cycle_reported_once() -> None:
    problems = steps_problems(
        """
        a: {topic: t, depends_on: [b]}
        b: {topic: t, depends_on: [a, c]}
        c: {topic: t, depends_on: [b]}
        x: {topic: t, depends_on: [y]}
        y: {topic: t, depends_on: [x]}
        """
    )
    assert [p.message for p in problems] == [
        "dependency cycle: a -> b -> a",
        "dependency cycle: b -> c -> b",
        "dependency cycle: x -> y -> x",
    ]


# --- templates -------------------------------------------------------------------------------


def test_template_syntax_errors_everywhere() -> None:
    problems = steps_problems(
        """
        a:
          topic: t
          input: {x: "{{ input.x }"}
          when: "input.x =="
          for_each: "{% for %}"
        n:
          type: notify
          message: "{{ nope"
        """
    )
    assert [(p.location, p.line) for p in problems] == [
        ("steps.a.input.x", 6),
        ("steps.a.when", 7),
        ("steps.a.for_each", 8),
        ("steps.n.message", 11),
    ]
    assert all(p.message.startswith("template syntax error:") for p in problems)


def test_template_step_references_must_be_upstream() -> None:
    problems = steps_problems(
        """
        a: {topic: t}
        b: {topic: t, depends_on: a}
        c:
          topic: t
          depends_on: b
          input:
            ok: "{{ steps.a.output }}"
            sideways: "{{ steps.d.output }}"
            typo: "{{ steps['bb'].output }}"
            own: "{{ steps.c.output }}"
        d: {topic: t}
        """
    )
    assert triples(problems) == [
        ("steps.c.input.sideways", "step 'd' is not upstream of 'c'; add it to depends_on", 11),
        ("steps.c.input.typo", "unknown step 'bb' in steps.bb (did you mean 'b'?)", 12),
        ("steps.c.input.own", "a step cannot reference its own output (steps.c)", 13),
    ]


def test_condition_references_are_checked_too() -> None:
    problem = only(steps_problems("a: {topic: t}\nb:\n  topic: t\n  when: steps.a.output.ok\n"))
    assert problem.location == "steps.b.when"
    assert problem.message == "step 'a' is not upstream of 'b'; add it to depends_on"


def test_unknown_variables() -> None:
    problems = steps_problems(
        """
        a:
          topic: t
          input:
            x: "{{ inputs.x }}"
            y: "{{ secrets }}"
            fine: "{% for k in input.keys %}{{ k }}{% endfor %} {{ range(3) | list }} {{ run.id }}"
        """
    )
    assert triples(problems) == [
        ("steps.a.input.x", "unknown variable 'inputs' (did you mean 'input'?)", 7),
        ("steps.a.input.y", "unknown variable 'secrets' (available: input, steps, item, index, run)", 8),
    ]


def test_item_and_index_only_inside_for_each() -> None:
    problems = steps_problems(
        """
        a:
          topic: t
          input: "{{ item }}"
        b:
          topic: t
          for_each: "{{ input.rows }}"
          when: "index > 0"
          input: {row: "{{ item }}", n: "{{ index }}"}
        c:
          topic: t
          for_each: "item"
        """
    )
    assert [(p.location, p.message) for p in problems] == [
        ("steps.a.input", "'item' is only defined in for_each steps"),
        ("steps.b.when", "'index' is not available in 'when' (it is evaluated once, before the fan-out)"),
        ("steps.c.for_each", "'item' is not available in 'for_each' (it is evaluated once, before the fan-out)"),
    ]


def test_condition_must_be_a_single_expression() -> None:
    problem = only(steps_problems("a:\n  topic: t\n  when: '{{ input.a }} and {{ input.b }}'\n"))
    assert problem.location == "steps.a.when"
    assert "expected a single expression" in problem.message


# --- reporting -------------------------------------------------------------------------------


def test_all_problems_reported_together_sorted_by_line() -> None:
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow(DATA / "broken.yaml")
    error = info.value
    assert triples(error.problems) == [
        ("steps.fetch", "unknown field 'dependz_on' (did you mean 'depends_on'?)", 6),
        ("steps.transform.depends_on[1]", "unknown step 'missing'", 9),
        ("steps.transform.input.rows", "step 'report' is not upstream of 'transform'; add it to depends_on", 11),
        ("steps.report.type", "unknown step type 'report'; allowed: 'job', 'approval', 'notify', 'guardrail'", 13),
    ]
    filename = str(DATA / "broken.yaml")
    lines = str(error).splitlines()
    assert len(lines) == 4
    assert lines[1] == f"{filename}:9: steps.transform.depends_on[1]: unknown step 'missing'"


def test_filename_for_text_source() -> None:
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow("id: wf\nversion: 1\nsteps: {a: {}}\n", filename="flows/wf.yaml")
    assert str(info.value) == "flows/wf.yaml:3: steps.a: job step needs a 'topic'"


def test_parse_workflow_reports_without_lines() -> None:
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow({"id": "wf", "version": 1, "steps": {"a": {"depends_on": ["zz"], "topic": "t"}}})
    assert info.value.problems == [Problem("steps.a.depends_on[0]", "unknown step 'zz'", None)]
    assert str(info.value) == "<workflow>: steps.a.depends_on[0]: unknown step 'zz'"


def test_format_problems() -> None:
    problems = [Problem("steps.a", "bad", 3), Problem("", "empty", None)]
    assert format_problems(problems, "x.yaml") == "x.yaml:3: steps.a: bad\nx.yaml: empty"
    assert format_problems([]) == ""


def test_recursive_alias_is_rejected() -> None:
    assert only(problems_of("id: wf\nversion: 1\nsteps: &s {a: {topic: t, input: *s}}\n")).message == (
        "recursive YAML aliases are not supported"
    )


def test_alias_bomb_is_rejected() -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    text = "id: wf\nversion: 1\nsteps: {a: {topic: t}}\nx:\n" + "".join(f"  {line}\n" for line in levels)
    assert "too large" in only(problems_of(text)).message


def test_control_characters_are_a_yaml_problem_not_a_crash() -> None:
    # the YAML reader refuses them before parsing: that must read as a problem too (the HTTP API's fuzzing found it)
    problem = only(problems_of("\x1e"))
    assert problem.message.startswith("invalid YAML:") and "#x001e" in problem.message
