"""Load workflow definitions from YAML, mapping every problem to a line."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, SequenceNode

from ._guard import guard_files
from ._model import Workflow
from ._problems import Path, Problem, WorkflowInvalid, format_path

# Bounds the line-map walk: aliases can make a tiny file expand into a huge tree.
_MAX_NODES = 200_000
_TOO_DEEP = "the workflow is nested too deeply"


DEFAULT_MAX_BYTES = 1024 * 1024
MAX_BYTES_ENV = "INTERLOCK_WORKFLOW_MAX_BYTES"


@dataclass(frozen=True)
class LoadSettings:
    """Limits applied before a workflow file is parsed."""

    # A 32 MB file once took minutes and gigabytes to reject: refuse by size first.
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_env(cls) -> LoadSettings:
        """Read ``INTERLOCK_WORKFLOW_MAX_BYTES`` (bytes; unset or empty: 1 MiB)."""
        raw = os.environ.get(MAX_BYTES_ENV, "").strip()
        if not raw:
            return cls()
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{MAX_BYTES_ENV} must be a positive integer (bytes), got {raw!r}") from None
        if value <= 0:
            raise ValueError(f"{MAX_BYTES_ENV} must be a positive integer (bytes), got {raw!r}")
        return cls(max_bytes=value)


def _too_large(size: int, limit: int) -> Problem:
    message = f"the workflow is {size} bytes, over the limit of {limit} bytes (set {MAX_BYTES_ENV} to change it)"
    return Problem("", message)


def decode_workflow(data: bytes, filename: str | None = None, *, max_bytes: int | None = None) -> str:
    """The text of a workflow file's bytes: UTF-8, no NUL bytes, within the size limit.

    Raises ``WorkflowInvalid`` with one problem naming the file (and the byte offset).
    """
    limit = LoadSettings.from_env().max_bytes if max_bytes is None else max_bytes
    if len(data) > limit:
        raise WorkflowInvalid([_too_large(len(data), limit)], filename)
    nul = data.find(b"\0")
    if nul >= 0:
        raise WorkflowInvalid([Problem("", f"not a text file: NUL byte at byte offset {nul}")], filename)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        message = f"not UTF-8 text: invalid byte 0x{data[exc.start]:02x} at byte offset {exc.start}"
        raise WorkflowInvalid([Problem("", message, line)], filename) from None


def read_workflow_file(path: str | pathlib.Path, *, max_bytes: int | None = None) -> str:
    """Read a workflow file's text, checking its size before reading. Raises ``WorkflowInvalid``."""
    path = pathlib.Path(path)
    limit = LoadSettings.from_env().max_bytes if max_bytes is None else max_bytes
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)  # never read more than the limit allows
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise WorkflowInvalid([Problem("", f"cannot read workflow: {exc.strerror or exc}")], str(path)) from None
    if len(data) > limit:
        raise WorkflowInvalid([_too_large(max(size, len(data)), limit)], str(path))
    return decode_workflow(data, str(path), max_bytes=limit)


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
    try:
        loader = _Loader(text)
    except yaml.YAMLError as exc:  # the reader refuses control characters before parsing starts
        raise WorkflowInvalid([Problem("", f"invalid YAML: {exc}")]) from None
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


def load_workflow(source: str | pathlib.Path, *, filename: str | None = None,
                  max_bytes: int | None = None, files: Mapping[str, str] | None = None) -> Workflow:
    """Load and validate a workflow: a ``Path`` is read from disk, a ``str`` is YAML text.

    ``max_bytes`` (default: ``INTERLOCK_WORKFLOW_MAX_BYTES``, else 1 MiB) is checked before
    parsing. ``files``: the guard rule files shipped with the workflow (relative path -> text);
    for a ``Path`` left None, the files it names are read beside it. Raises ``WorkflowInvalid``
    listing every problem found.
    """
    if isinstance(source, pathlib.Path):
        filename = filename or str(source)
        try:
            text = read_workflow_file(source, max_bytes=max_bytes)
        except WorkflowInvalid as exc:
            raise WorkflowInvalid(exc.problems, filename) from None
    else:
        text = source
        limit = LoadSettings.from_env().max_bytes if max_bytes is None else max_bytes
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise WorkflowInvalid([_too_large(size, limit)], filename)
    try:
        data, lines, duplicate_problems = _read_yaml(text)
    except WorkflowInvalid as exc:
        raise WorkflowInvalid(exc.problems, filename) from None
    if files is None and isinstance(source, pathlib.Path):
        files = read_rule_files(source, guard_files(data), max_bytes=max_bytes)
    try:
        workflow = Workflow.model_validate(data, context={"lines": lines, "files": dict(files or {})})
    except WorkflowInvalid as exc:
        problems = sorted(duplicate_problems + exc.problems, key=lambda p: (p.line is None, p.line or 0))
        raise WorkflowInvalid(problems, filename) from None
    if duplicate_problems:
        raise WorkflowInvalid(duplicate_problems, filename)
    return workflow


def parse_workflow(data: dict[str, Any], files: Mapping[str, str] | None = None) -> Workflow:
    """Validate an already-parsed definition (no line numbers). Raises ``WorkflowInvalid``."""
    return Workflow.model_validate(data, context={"files": dict(files or {})})


def read_rule_files(workflow_path: str | pathlib.Path, names: list[str], *,
                    max_bytes: int | None = None) -> dict[str, str]:
    """The guard rule files ``names`` (relative to the workflow file's folder) as text; a file
    that cannot be read is left out (validation then reports it as not shipped, by its YAML path).
    Each file is held to the same size limit as a workflow."""
    base = pathlib.Path(workflow_path).parent
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = read_workflow_file(base / name, max_bytes=max_bytes)
        except WorkflowInvalid:
            continue
    return out


def workflow_files(path: str | pathlib.Path, *, max_bytes: int | None = None) -> tuple[str, dict[str, str]]:
    """A workflow file's text and the guard rule files it names (read beside it): what
    ``interlock workflows apply`` sends, so the version is registered with its rule files."""
    text = read_workflow_file(path, max_bytes=max_bytes)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text, {}  # the registry reports the YAML error with its line
    return text, read_rule_files(path, guard_files(data), max_bytes=max_bytes)
