"""Load workflow definitions from YAML, mapping every problem to a line."""

from __future__ import annotations

import pathlib
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, SequenceNode

from ._model import Workflow
from ._problems import Path, Problem, WorkflowInvalid, format_path

# Bounds the line-map walk: aliases can make a tiny file expand into a huge tree.
_MAX_NODES = 200_000
_TOO_DEEP = "the workflow is nested too deeply"


class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys (PyYAML silently keeps the last)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[MappingNode, Node, Any]] = []

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            try:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    self.duplicates.append((node, key_node, key))
                seen.add(key)
            except (TypeError, yaml.YAMLError):  # unhashable keys: the base class reports them
                continue
        return super().construct_mapping(node, deep)


class _Unsupported(Exception):
    pass


def _line_map(root: Node) -> tuple[dict[Path, int], dict[int, Path]]:
    """Path -> 1-based line, and id(mapping node) -> path (to place duplicate keys)."""
    keys = SafeConstructor()
    lines: dict[Path, int] = {(): root.start_mark.line + 1}
    where: dict[int, Path] = {}
    budget = _MAX_NODES

    def visit(node: Node, path: Path, active: frozenset[int]) -> None:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise _Unsupported("the workflow is too large once YAML aliases are expanded")
        if id(node) in active:
            raise _Unsupported("recursive YAML aliases are not supported")
        active = active | {id(node)}
        if isinstance(node, MappingNode):
            where.setdefault(id(node), path)
            for key_node, value_node in node.value:
                try:
                    key = keys.construct_object(key_node, deep=True)
                    hash(key)
                except (TypeError, yaml.YAMLError):
                    continue
                child = (*path, key)
                lines[child] = key_node.start_mark.line + 1  # last wins, as in the loaded dict
                visit(value_node, child, active)
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                child = (*path, i)
                lines[child] = item.start_mark.line + 1
                visit(item, child, active)

    visit(root, (), frozenset())
    return lines, where


def _read_yaml(text: str) -> tuple[Any, dict[Path, int], list[Problem]]:
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise WorkflowInvalid([Problem("", "the workflow is empty", 1)])
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = ": ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise WorkflowInvalid([Problem("", f"invalid YAML: {detail}", mark.line + 1 if mark else None)]) from None
    except yaml.YAMLError as exc:
        raise WorkflowInvalid([Problem("", f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise WorkflowInvalid([Problem("", _TOO_DEEP)]) from None
    finally:
        loader.dispose()
    try:
        lines, where = _line_map(root)
    except _Unsupported as exc:
        raise WorkflowInvalid([Problem("", str(exc))]) from None
    except RecursionError:
        raise WorkflowInvalid([Problem("", _TOO_DEEP)]) from None
    duplicates = [
        Problem(format_path((*where.get(id(mapping), ()), key)), "duplicate key", key_node.start_mark.line + 1)
        for mapping, key_node, key in loader.duplicates
    ]
    return data, lines, duplicates


def load_workflow(source: str | pathlib.Path, *, filename: str | None = None) -> Workflow:
    """Load and validate a workflow: a ``Path`` is read from disk, a ``str`` is YAML text.

    Raises ``WorkflowInvalid`` listing every problem found.
    """
    if isinstance(source, pathlib.Path):
        filename = filename or str(source)
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise WorkflowInvalid([Problem("", f"cannot read workflow: {exc}")], filename) from None
    else:
        text = source
    try:
        data, lines, duplicate_problems = _read_yaml(text)
    except WorkflowInvalid as exc:
        raise WorkflowInvalid(exc.problems, filename) from None
    try:
        workflow = Workflow.model_validate(data, context={"lines": lines})
    except WorkflowInvalid as exc:
        problems = sorted(duplicate_problems + exc.problems, key=lambda p: (p.line is None, p.line or 0))
        raise WorkflowInvalid(problems, filename) from None
    if duplicate_problems:
        raise WorkflowInvalid(duplicate_problems, filename)
    return workflow


def parse_workflow(data: dict[str, Any]) -> Workflow:
    """Validate an already-parsed definition (no line numbers). Raises ``WorkflowInvalid``."""
    return Workflow.model_validate(data)
