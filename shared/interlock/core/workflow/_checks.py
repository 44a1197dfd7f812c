"""Cross-field checks on a raw workflow mapping.

They run on the raw data (not the model) so that they can report problems even when some
other part of the definition fails pydantic validation. Anything with the wrong shape is
skipped here: pydantic reports it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

from jinja2 import TemplateError, TemplateSyntaxError, nodes

from interlock.core.sealed import DEFAULT_SENSITIVE_KEYS, key_matches

from ._problems import Issue, Path
from ._templates import (
    CONTEXT_VARIABLES,
    ENV,
    analyze,
    expression_source,
    is_template,
    parse_expression,
    single_expression,
)

STEP_TYPES = ("job", "approval", "notify", "guardrail")

# Fields that only mean something for one step type; elsewhere they would be silently ignored,
# so they are reported instead.
_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "job": ("topic", "require_approval", "heartbeat_timeout_ms", "compensate", "cache", "breaker", "agent_version"),
    "approval": ("approvers", "prompt", "expires_ms"),
    "notify": ("channel", "message"),
}

_MAX_CYCLES = 20
_CYCLE_SEARCH_BUDGET = 100_000


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def transitive(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    """Every node reachable from ``start`` (excluding ``start`` unless on a cycle)."""
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def semantic_issues(data: Mapping[str, Any]) -> list[Issue]:
    steps = data.get("steps")
    if not isinstance(steps, Mapping):
        return []
    if not steps:
        return [Issue(("steps",), "a workflow needs at least one step")]
    issues: list[Issue] = []
    ids = [key for key in steps if isinstance(key, str)]
    deps = {sid: _check_depends_on(sid, steps[sid], ids, issues) for sid in ids}
    issues.extend(_cycle_issues(ids, deps))
    upstream = {sid: transitive(deps, sid) for sid in ids}
    sensitive = _check_sensitive(data.get("sensitive"), ids, issues)
    _check_sla(data.get("sla"), ids, issues)
    for sid in ids:
        step = steps[sid]
        if isinstance(step, Mapping):
            _check_step(sid, step, issues)
            _check_step_templates(sid, step, ids, upstream[sid], issues, sensitive)
    return issues


RESERVED_CHANNELS = ("alerts",)  # the auditor's: a notify step may not publish there


def _check_sla(raw: Any, ids: list[str], issues: list[Issue]) -> None:
    """An SLA may only name the workflow's steps."""
    steps = raw.get("steps") if isinstance(raw, Mapping) else None
    if not isinstance(steps, Mapping):
        return
    for name in steps:
        if name not in ids:
            hint = did_you_mean(str(name), ids)
            issues.append(Issue(("sla", "steps", str(name)), f"no step {name!r} in this workflow{hint}"))


_SENSITIVE_PATH = re.compile(r"^(input|steps\.([A-Za-z][A-Za-z0-9_-]*)\.output)(\.[A-Za-z0-9_$-]+)*$")


def _check_sensitive(raw: Any, ids: list[str], issues: list[Issue]) -> frozenset[str]:
    """Report bad ``sensitive`` entries; return the usable paths."""
    if not isinstance(raw, list):
        return frozenset()  # absent, or the wrong shape (pydantic reports that)
    good: set[str] = set()
    for i, path in enumerate(raw):
        if not isinstance(path, str):
            continue
        match = _SENSITIVE_PATH.match(path)
        if match is None:
            issues.append(Issue(("sensitive", i), f"invalid sensitive path {path!r}: write input.NAME… or "
                                                  "steps.STEP.output.NAME… (dotted keys, no templates)"))
        elif match.group(2) is not None and match.group(2) not in ids:
            step = match.group(2)
            issues.append(Issue(("sensitive", i), f"unknown step {step!r} in {path!r}{did_you_mean(step, ids)}"))
        else:
            good.add(path)
    return frozenset(good)


def _check_depends_on(sid: str, step: Any, ids: list[str], issues: list[Issue]) -> list[str]:
    """Report bad entries; return the usable dependencies."""
    if not isinstance(step, Mapping):
        return []
    raw = step.get("depends_on")
    base: Path = ("steps", sid, "depends_on")
    entries: list[tuple[Path, Any]]
    if isinstance(raw, str):
        entries = [(base, raw)]
    elif isinstance(raw, list):
        entries = [((*base, i), dep) for i, dep in enumerate(raw)]
    else:
        return []
    good: list[str] = []
    for path, dep in entries:
        if not isinstance(dep, str):
            continue
        if dep == sid:
            issues.append(Issue(path, "a step cannot depend on itself"))
        elif dep not in ids:
            issues.append(Issue(path, f"unknown step {dep!r}{did_you_mean(dep, ids)}"))
        elif dep in good:
            issues.append(Issue(path, f"duplicate dependency {dep!r}"))
        else:
            good.append(dep)
    return good


def _check_step(sid: str, step: Mapping[str, Any], issues: list[Issue]) -> None:
    base: Path = ("steps", sid)
    step_type = step.get("type", "job")
    if step_type in STEP_TYPES:
        for other, fields in _ONLY_FOR.items():
            if other == step_type:
                continue
            for field in fields:
                if field in step:
                    issues.append(Issue((*base, field), f"'{field}' only applies to {other} steps"))
        if step_type == "job" and step.get("topic") is None:
            issues.append(Issue(base, "job step needs a 'topic'"))
        if step_type == "approval" and step.get("approvers") is None:
            # No silent default role: whoever may approve must be written down.
            issues.append(Issue(base, "approval step needs 'approvers' (the role allowed to decide)"))
        if "guard" in step and step_type not in ("job", "guardrail"):
            issues.append(Issue((*base, "guard"), "'guard' only applies to job and guardrail steps"))
        if step_type == "guardrail":
            _check_guardrail(base, step, issues)
        if step_type == "notify" and step.get("channel") in RESERVED_CHANNELS:
            issues.append(Issue((*base, "channel"), f"channel {step.get('channel')!r} is reserved for alerts"))
    if "max_parallel" in step and step.get("for_each") is None:
        issues.append(Issue((*base, "max_parallel"), "max_parallel needs for_each"))
    heartbeat, timeout = step.get("heartbeat_timeout_ms"), step.get("timeout_ms")
    if _is_int(heartbeat) and _is_int(timeout) and heartbeat > timeout:
        issues.append(Issue((*base, "heartbeat_timeout_ms"), f"must not exceed timeout_ms ({heartbeat} > {timeout})"))


def _check_guardrail(base: Path, step: Mapping[str, Any], issues: list[Issue]) -> None:
    if step.get("guard") is None:
        issues.append(Issue(base, "guardrail step needs a 'guard' (the checks to run)"))
    deps = step.get("depends_on")
    count = 1 if isinstance(deps, str) else len(deps) if isinstance(deps, list) else 0
    if step.get("input") is None and count != 1:
        issues.append(Issue(base, "guardrail step checks the output of the one step it depends on: give it one "
                                  "'depends_on' step, or an 'input' saying what to check"))


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# --- templates -------------------------------------------------------------------------------


def _check_step_templates(
    sid: str, step: Mapping[str, Any], ids: list[str], upstream: set[str], issues: list[Issue],
    sensitive: frozenset[str] = frozenset(),
) -> None:
    base: Path = ("steps", sid)
    in_loop = step.get("for_each") is not None

    def check(source: Any, path: Path, *, expression: bool, item_ok: bool) -> None:
        if isinstance(source, str):
            _check_template(source, path, sid, expression, item_ok, ids, upstream, issues)
            if not expression and single_expression_or_none(source) is None:
                _check_interpolation(source, path, sensitive, issues)

    for path, text in _strings(step.get("input"), (*base, "input")):
        if is_template(text):
            check(text, path, expression=False, item_ok=in_loop)
    # `when` and `for_each` are evaluated once per step, before any fan-out: no item/index.
    check(step.get("when"), (*base, "when"), expression=True, item_ok=False)
    check(step.get("for_each"), (*base, "for_each"), expression=True, item_ok=False)
    check(step.get("message"), (*base, "message"), expression=False, item_ok=in_loop)
    check(step.get("prompt"), (*base, "prompt"), expression=False, item_ok=in_loop)
    cache = step.get("cache")
    if isinstance(cache, Mapping):
        # rendered by the dispatcher for the step (not per for_each item: the job hash tells items apart)
        check(cache.get("key"), (*base, "cache", "key"), expression=False, item_ok=False)


def _strings(value: Any, path: Path) -> Iterable[tuple[Path, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*path, i))


def _check_template(
    source: str,
    path: Path,
    sid: str,
    expression: bool,
    item_ok: bool,
    ids: list[str],
    upstream: set[str],
    issues: list[Issue],
) -> None:
    try:
        tree: nodes.Template = parse_expression(expression_source(source)) if expression else ENV.parse(source)
    except TemplateSyntaxError as exc:
        issues.append(Issue(path, f"template syntax error: {exc.message} (in {source!r})"))
        return
    # Parsing does not look filters and tests up; compiling (in analyze) raises on them.
    unknown = False
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        known = ENV.filters if isinstance(node, nodes.Filter) else ENV.tests
        if node.name not in known:
            kind = "filter" if isinstance(node, nodes.Filter) else "test"
            issues.append(Issue(path, f"unknown {kind} {node.name!r}{did_you_mean(node.name, known)} (in {source!r})"))
            unknown = True
    if unknown:
        return
    try:
        refs = analyze(tree)
    except TemplateError as exc:  # anything else the compiler refuses
        issues.append(Issue(path, f"template error: {exc.message} (in {source!r})"))
        return
    for var in sorted(refs.variables):
        if var in ("item", "index"):
            if not item_ok:
                where = path[-1] if path[-1] in ("when", "for_each") else None
                message = (
                    f"'{var}' is not available in '{where}' (it is evaluated once, before the fan-out)"
                    if where
                    else f"'{var}' is only defined in for_each steps"
                )
                issues.append(Issue(path, message))
        elif var not in CONTEXT_VARIABLES:
            hint = did_you_mean(var, CONTEXT_VARIABLES) or f" (available: {', '.join(CONTEXT_VARIABLES)})"
            issues.append(Issue(path, f"unknown variable {var!r}{hint}"))
    for ref in refs.steps:
        if ref == sid:
            issues.append(Issue(path, f"a step cannot reference its own output (steps.{ref})"))
        elif ref not in ids:
            issues.append(Issue(path, f"unknown step {ref!r} in steps.{ref}{did_you_mean(ref, ids)}"))
        elif ref not in upstream:
            issues.append(Issue(path, f"step {ref!r} is not upstream of {sid!r}; add it to depends_on"))


def single_expression_or_none(source: str) -> str | None:
    try:
        return single_expression(source)
    except TemplateSyntaxError:
        return None  # reported by _check_template


def _chain(node: nodes.Node) -> list[str] | None:
    """``input.a.b`` / ``steps['x'].output`` as its names, or None if not rooted at input/steps."""
    names: list[str] = []
    while isinstance(node, nodes.Getattr | nodes.Getitem):
        if isinstance(node, nodes.Getattr):
            names.append(node.attr)
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            names.append(node.arg.value)
        else:
            return None
        node = node.node
    if not (isinstance(node, nodes.Name) and node.name in ("input", "steps")):
        return None
    return [node.name, *reversed(names)]


def _check_interpolation(source: str, path: Path, sensitive: frozenset[str], issues: list[Issue]) -> None:
    """A sensitive value written into a larger string would leave its envelope: refused."""
    try:
        tree = ENV.parse(source)
    except TemplateSyntaxError:
        return  # reported by _check_template
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        names = _chain(node)
        if names is None:
            continue
        dotted = ".".join(names)
        hit = (any(dotted == p or dotted.startswith(p + ".") or p.startswith(dotted + ".") for p in sensitive)
               or any(key_matches(name, DEFAULT_SENSITIVE_KEYS) for name in names[1:]))
        if hit:
            issues.append(Issue(path, f"{dotted} is sensitive and cannot be interpolated into a string (it stays "
                                      f"sealed); pass it as a whole value, e.g. key: \"{{{{ {dotted} }}}}\" "
                                      f"(in {source!r})"))
            return


# --- cycles ----------------------------------------------------------------------------------


def _cycle_issues(ids: list[str], deps: Mapping[str, list[str]]) -> list[Issue]:
    return [
        Issue(("steps", cycle[0], "depends_on"), "dependency cycle: " + " -> ".join(cycle))
        for cycle in find_cycles(ids, deps)
    ]


def find_cycles(ids: list[str], deps: Mapping[str, list[str]]) -> list[list[str]]:
    """Elementary cycles, each once, starting at its earliest-defined step.

    An arrow reads "depends on". Self-dependencies are not included (reported separately).
    The search is bounded; pathological graphs get the first cycles found.
    """
    order = {sid: i for i, sid in enumerate(ids)}
    reach = {sid: transitive(deps, sid) for sid in ids}
    cycles: list[list[str]] = []
    budget = _CYCLE_SEARCH_BUDGET
    for start in ids:
        if start not in reach[start]:
            continue
        # Only later steps on a cycle through `start`: each cycle is found from its first step.
        allowed = {n for n in reach[start] if order[n] > order[start] and start in reach[n]}
        path = [start]
        on_path = {start}
        stack = [iter(deps[start])]
        while stack:
            budget -= 1
            if budget <= 0:
                return cycles
            for nxt in stack[-1]:
                if nxt == start:
                    cycles.append([*path, start])
                    if len(cycles) >= _MAX_CYCLES:
                        return cycles
                elif nxt in allowed and nxt not in on_path:
                    path.append(nxt)
                    on_path.add(nxt)
                    stack.append(iter(deps[nxt]))
                    break
            else:
                stack.pop()
                on_path.discard(path.pop())
    return cycles
