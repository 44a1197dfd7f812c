"""Template rendering: native values, string rendering, conditions, for_each, errors."""

from __future__ import annotations

from typing import Any

import pytest

from interlock.core.workflow import (
    TemplateError,
    evaluate_condition,
    evaluate_for_each,
    render_input,
    render_text,
)


@pytest.fixture
def ctx() -> dict[str, Any]:
    return {
        "input": {"alert": {"id": "A1", "sev": 2}, "services": ["api", "db"], "dry_run": False},
        "steps": {
            "classify": {"output": {"severity": "high", "score": 0.9}, "status": "succeeded"},
            "patch_plan": {"output": {"plan": {"files": ["a.py"]}}, "status": "succeeded"},
        },
        "run": {"id": "run-1", "tenant": "acme", "workflow": "incident-remediation"},
    }


def test_single_expression_yields_native_values(ctx: dict[str, Any]) -> None:
    rendered = render_input(
        {
            "alert": "{{ input.alert }}",
            "services": "{{ input.services }}",
            "sev": "{{ input.alert.sev }}",
            "dry_run": "{{ input.dry_run }}",
            "plan": "  {{ steps.patch_plan.output.plan }}  ",
            "trimmed": "{{- input.alert.sev + 1 -}}",
            "none": "{{ none }}",
        },
        ctx,
    )
    assert rendered == {
        "alert": {"id": "A1", "sev": 2},
        "services": ["api", "db"],
        "sev": 2,
        "dry_run": False,
        "plan": {"files": ["a.py"]},
        "trimmed": 3,
        "none": None,
    }


def test_mixed_strings_render_to_text(ctx: dict[str, Any]) -> None:
    rendered = render_input(
        {
            "summary": "Alert {{ input.alert.id }} is {{ steps.classify.output.severity }}",
            "two": "{{ input.alert.sev }}{{ input.alert.sev }}",
            "loop": "{% for s in input.services %}{{ s }};{% endfor %}",
            "tenant": "tenant={{ run.tenant }}",
        },
        ctx,
    )
    assert rendered == {
        "summary": "Alert A1 is high",
        "two": "22",
        "loop": "api;db;",
        "tenant": "tenant=acme",
    }


def test_non_templates_pass_through(ctx: dict[str, Any]) -> None:
    value = {"n": 1, "f": 1.5, "b": True, "none": None, "plain": "no braces", "nested": [{"k": ["x", 2]}]}
    assert render_input(value, ctx) == value


def test_lists_and_nesting(ctx: dict[str, Any]) -> None:
    assert render_input(["{{ input.alert.id }}", ["{{ 1 + 1 }}", "x"]], ctx) == ["A1", [2, "x"]]


def test_item_and_index(ctx: dict[str, Any]) -> None:
    loop_ctx = {**ctx, "item": {"name": "api"}, "index": 0}
    assert render_input({"svc": "{{ item.name }}", "i": "{{ index }}"}, loop_ctx) == {"svc": "api", "i": 0}


def test_missing_attribute_error_names_location_and_expression(ctx: dict[str, Any]) -> None:
    with pytest.raises(TemplateError) as info:
        render_input({"plan": "{{ steps.patch_plan.output.x }}"}, ctx, location="steps.apply.input")
    error = info.value
    assert error.location == "steps.apply.input.plan"
    assert str(error).startswith("steps.apply.input.plan: 'dict object' has no attribute 'x'")
    assert "steps.patch_plan.output.x" in str(error)


def test_undefined_inside_a_native_container_is_an_error(ctx: dict[str, Any]) -> None:
    with pytest.raises(TemplateError, match="has no attribute 'nope'"):
        render_input("{{ [input.alert.nope] }}", ctx)


def test_undefined_in_text_is_an_error(ctx: dict[str, Any]) -> None:
    with pytest.raises(TemplateError, match=r"^input\[1\]: 'missing' is undefined"):
        render_input(["ok", "x {{ missing }}"], ctx)


def test_runtime_errors_are_template_errors(ctx: dict[str, Any]) -> None:
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        render_input("{{ 1 / 0 }}", ctx)


def test_sandbox_blocks_unsafe_access(ctx: dict[str, Any]) -> None:
    with pytest.raises(TemplateError, match="unsafe"):
        render_input("{{ input.__class__.__mro__ }}", ctx)


def test_render_text_always_returns_str(ctx: dict[str, Any]) -> None:
    assert render_text("{{ input.alert.sev }}", ctx) == "2"
    with pytest.raises(TemplateError, match=r"^steps\.n\.message: "):
        render_text("{{ nope }}", ctx, location="steps.n.message")


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("steps.classify.output.severity == 'high'", True),
        ("{{ steps.classify.output.severity == 'high' }}", True),
        ("  {{ steps.classify.output.severity == 'low' }}  ", False),
        ("steps.classify.output.score > 0.5 and not input.dry_run", True),
        ("input.services | length > 2", False),
        ("input.alert.missing is defined", False),
        ("true", True),
        ("false", False),
        ("input.services", True),
    ],
)
def test_conditions(ctx: dict[str, Any], expr: str, expected: bool) -> None:
    assert evaluate_condition(expr, ctx) is expected


def test_condition_on_missing_value_is_an_error(ctx: dict[str, Any]) -> None:
    with pytest.raises(TemplateError) as info:
        evaluate_condition("steps.classify.output.nope == 'high'", ctx, location="steps.patch.when")
    assert info.value.location == "steps.patch.when"
    assert "has no attribute 'nope'" in info.value.message


def test_condition_that_is_a_template_is_rejected(ctx: dict[str, Any]) -> None:
    with pytest.raises(TemplateError, match="single expression"):
        evaluate_condition("{{ true }} and {{ false }}", ctx)


def test_condition_syntax_error(ctx: dict[str, Any]) -> None:
    with pytest.raises(TemplateError, match=r"^when: "):
        evaluate_condition("input.x ==", ctx)


def test_for_each(ctx: dict[str, Any]) -> None:
    assert evaluate_for_each("input.services", ctx) == ["api", "db"]
    assert evaluate_for_each("{{ input.services | reverse | list }}", ctx) == ["db", "api"]
    assert evaluate_for_each("range(3) | list", ctx) == [0, 1, 2]
    assert evaluate_for_each("[]", ctx) == []


@pytest.mark.parametrize("expr", ["input.alert", "input.alert.id", "input.alert.sev"])
def test_for_each_must_yield_a_list(ctx: dict[str, Any], expr: str) -> None:
    with pytest.raises(TemplateError, match="for_each must evaluate to a list") as info:
        evaluate_for_each(expr, ctx, location="steps.fan.for_each")
    assert info.value.location == "steps.fan.for_each"
