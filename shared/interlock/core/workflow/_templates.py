"""Jinja2 templates in step inputs, conditions, for_each and messages.

Everything runs in a sandboxed environment with ``StrictUndefined``: a typo in a template is
an error, never an empty string.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import StrictUndefined, Template, TemplateSyntaxError, Undefined, meta, nodes
from jinja2.environment import TemplateExpression
from jinja2.parser import Parser
from jinja2.sandbox import SandboxedEnvironment

from interlock.core.sealed import redact

CONTEXT_VARIABLES = ("input", "steps", "item", "index", "run")
"""Names a template may use (plus Jinja's own globals such as ``range``)."""

# a sealed value written into text (a notify message, a prompt) shows as the redaction marker
ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, finalize=redact)


class TemplateError(Exception):
    """Rendering a template failed at run time."""

    def __init__(self, location: str, message: str) -> None:
        self.location = location
        self.message = message
        super().__init__(f"{location}: {message}")


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


@lru_cache(maxsize=4096)  # called for every templated string on every planning pass
def single_expression(text: str) -> str | None:
    """The inner source if ``text`` is exactly one ``{{ expr }}`` (surrounding blanks allowed)."""
    stripped = text.strip()
    if not (stripped.startswith("{{") and stripped.endswith("}}")):
        return None
    # Parse rather than regex: "{{ a }} and {{ b }}" also starts with {{ and ends with }}.
    body = ENV.parse(stripped).body
    if len(body) != 1 or not isinstance(body[0], nodes.Output) or len(body[0].nodes) != 1:
        return None
    if isinstance(body[0].nodes[0], nodes.TemplateData):
        return None
    inner = stripped[2:-2]
    if inner[:1] in ("-", "+"):  # whitespace control: {{- x -}}
        inner = inner[1:]
    if inner.endswith("-"):
        inner = inner[:-1]
    return inner.strip()


def expression_source(text: str) -> str:
    """Accept a bare expression or one wrapped in ``{{ }}``; return the bare form."""
    inner = single_expression(text)
    if inner is not None:
        return inner
    if is_template(text):
        raise TemplateSyntaxError("expected a single expression, not a template", 1)
    return text


def parse_expression(source: str) -> nodes.Template:
    """Parse a bare expression into a template AST (for static analysis)."""
    parser = Parser(ENV, source, state="variable")
    expr = parser.parse_expression()
    if not parser.stream.eos:
        raise TemplateSyntaxError("unexpected text after the expression", parser.stream.current.lineno)
    tree = nodes.Template([nodes.Output([expr])])
    tree.set_environment(ENV)
    return tree


@dataclass(frozen=True)
class TemplateRefs:
    """What a template reads: top-level names and the step ids under ``steps``."""

    variables: frozenset[str]
    steps: tuple[str, ...]


def analyze(tree: nodes.Template) -> TemplateRefs:
    variables = frozenset(meta.find_undeclared_variables(tree)) - ENV.globals.keys()
    steps: list[str] = []
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if not (isinstance(node, nodes.Getattr | nodes.Getitem) and _is_steps(node.node)):
            continue
        if isinstance(node, nodes.Getattr):
            steps.append(node.attr)
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            steps.append(node.arg.value)
        # steps[some_variable] is dynamic: nothing to check statically.
    return TemplateRefs(variables, tuple(dict.fromkeys(steps)))


def _is_steps(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Name) and node.name == "steps"


@lru_cache(maxsize=1024)
def _compile_template(source: str) -> Template:
    return ENV.from_string(source)


@lru_cache(maxsize=1024)
def _compile_expression(source: str) -> TemplateExpression:
    # undefined_to_none=False: otherwise a missing attribute silently becomes None.
    return ENV.compile_expression(source, undefined_to_none=False)


def checked_template(text: str) -> str:
    """``text`` once it parses as a template (a workflow's limit key); a syntax error is a ValueError."""
    if not text.strip():
        raise ValueError("a key must not be empty")
    try:
        _compile_template(text)
    except TemplateSyntaxError as exc:
        raise ValueError(f"invalid template {text!r}: {exc.message}") from None
    return text


def _check_defined(value: Any) -> None:
    """Raise the StrictUndefined error if an Undefined hides anywhere in a native result."""
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises UndefinedError with the useful message
        raise ValueError("undefined value")
    if isinstance(value, Mapping):
        for item in value.values():
            _check_defined(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_defined(item)


def _fail(location: str, source: str, exc: Exception) -> TemplateError:
    if isinstance(exc, jinja2.TemplateError):
        message = exc.message or type(exc).__name__
    else:
        message = f"{type(exc).__name__}: {exc}"
    return TemplateError(location, f"{message} (in {source!r})")


def _eval_expression(source: str, context: Mapping[str, Any], location: str) -> Any:
    try:
        value = _compile_expression(source)(**context)
        _check_defined(value)
    except Exception as exc:  # any failure inside user code is the template's fault
        raise _fail(location, source, exc) from exc
    if isinstance(value, float) and not math.isfinite(value):
        raise TemplateError(location, f"expression produced {value} (in {source!r})")
    return value


def render_text(template: str, context: Mapping[str, Any], *, location: str = "template") -> str:
    """Render ``template`` to a string (used for notify messages and approval prompts)."""
    try:
        return _compile_template(template).render(**context)
    except Exception as exc:
        raise _fail(location, template, exc) from exc


def _render_string(text: str, context: Mapping[str, Any], location: str) -> Any:
    if not is_template(text):
        return text
    try:
        inner = single_expression(text)
    except TemplateSyntaxError as exc:
        raise _fail(location, text, exc) from exc
    if inner is not None:
        return _eval_expression(inner, context, location)
    return render_text(text, context, location=location)


def render_input(value: Any, context: Mapping[str, Any], *, location: str = "input") -> Any:
    """Render templates inside a JSON-like value.

    A string that is exactly one ``{{ expr }}`` yields the expression's native value; other
    strings with template markup render to ``str``; everything else passes through.
    ``location`` (e.g. ``steps.apply.input``) prefixes error locations.
    """
    if isinstance(value, str):
        return _render_string(value, context, location)
    if isinstance(value, Mapping):
        return {k: render_input(v, context, location=f"{location}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render_input(v, context, location=f"{location}[{i}]") for i, v in enumerate(value)]
    return value


def _expression(expr: str, location: str) -> str:
    try:
        return expression_source(expr)
    except TemplateSyntaxError as exc:
        raise _fail(location, expr, exc) from exc


def evaluate_condition(expr: str, context: Mapping[str, Any], *, location: str = "when") -> bool:
    """Truthiness of a ``when`` expression, written bare or wrapped in ``{{ }}``."""
    return bool(_eval_expression(_expression(expr, location), context, location))


def evaluate_for_each(expr: str, context: Mapping[str, Any], *, location: str = "for_each") -> list[Any]:
    """Evaluate a ``for_each`` expression; it must produce a list."""
    value = _eval_expression(_expression(expr, location), context, location)
    if not isinstance(value, list | tuple):
        raise TemplateError(location, f"for_each must evaluate to a list, got {type(value).__name__} (in {expr!r})")
    return list(value)
