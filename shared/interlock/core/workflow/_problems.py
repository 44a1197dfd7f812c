"""Problem reports shared by the loader, the model and the validator."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Path = tuple[Any, ...]
"""A location inside the definition: mapping keys and sequence indexes."""

_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workflow definition."""

    location: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return _format_one(self, None)


class WorkflowInvalid(Exception):
    """A workflow definition has problems; ``problems`` lists all of them."""

    # Deliberately not a ValueError: pydantic would swallow a ValueError raised inside a
    # validator and re-wrap it, losing the problem list.

    def __init__(self, problems: Sequence[Problem], filename: str | None = None) -> None:
        self.problems: list[Problem] = list(problems)
        self.filename = filename
        super().__init__(format_problems(self.problems, filename))

    def __str__(self) -> str:
        return format_problems(self.problems, self.filename)


def format_path(path: Path) -> str:
    """``("steps", "b", "depends_on", 0)`` -> ``steps.b.depends_on[0]``."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out.append(f"[{part}]")
        elif isinstance(part, str) and _SIMPLE_KEY.match(part):
            out.append(f".{part}" if out else part)
        else:
            # Keys that would make the dotted form ambiguous (dots, spaces, non-strings).
            out.append(f"[{part!r}]")
    return "".join(out)


def _format_one(problem: Problem, filename: str | None) -> str:
    head = filename or "<workflow>"
    if problem.line is not None:
        head = f"{head}:{problem.line}"
    if problem.location:
        return f"{head}: {problem.location}: {problem.message}"
    return f"{head}: {problem.message}"


def format_problems(problems: Iterable[Problem], filename: str | None = None) -> str:
    """One ``file:line: location: message`` line per problem."""
    return "\n".join(_format_one(p, filename) for p in problems)


@dataclass(frozen=True)
class Issue:
    """A problem before line numbers are known.

    ``path`` is what the message is about; ``line_path`` (default: ``path``) is where in the
    YAML to point, e.g. the offending key of an unknown field while ``path`` is its parent.
    """

    path: Path
    message: str
    line_path: Path | None = None


def resolve_line(lines: Mapping[Path, int], path: Path) -> int | None:
    """Line of ``path``, or of its nearest ancestor present in the YAML."""
    for end in range(len(path), -1, -1):
        line = lines.get(path[:end])
        if line is not None:
            return line
    return None


def to_problems(issues: Iterable[Issue], lines: Mapping[Path, int] | None) -> list[Problem]:
    """Deduplicate, attach line numbers and sort by line (stable for ties)."""
    seen: set[tuple[str, str]] = set()
    problems: list[Problem] = []
    for issue in issues:
        location = format_path(issue.path)
        if (location, issue.message) in seen:
            continue
        seen.add((location, issue.message))
        line = None
        if lines:
            line = resolve_line(lines, issue.line_path if issue.line_path is not None else issue.path)
        problems.append(Problem(location, issue.message, line))
    problems.sort(key=lambda p: (p.line is None, p.line or 0))
    return problems
