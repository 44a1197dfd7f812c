"""Walking the strings of a JSON value, and what a check finds in one."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from interlock.core.sealed import is_sealed


@dataclass(frozen=True)
class Match:
    """A span a check found in one string of the value. ``text`` is kept in memory only (for
    allow rules and redaction): the event records :attr:`kind`, :attr:`path` and the span."""

    kind: str
    path: str
    start: int
    end: int
    text: str


def strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string in ``value`` with its path (``output.items[2].text``); sealed values are
    skipped (they are ciphertext: nothing readable to check)."""
    if isinstance(value, str):
        yield path, value
    elif is_sealed(value):
        return
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from strings(item, f"{path}[{i}]")


def replace_spans(value: Any, path: str, spans: dict[str, list[tuple[int, int, str]]]) -> Any:
    """``value`` with each ``(start, end, replacement)`` span of the string at a path replaced."""
    if not spans:
        return value
    if isinstance(value, str):
        todo = spans.get(path)
        if not todo:
            return value
        out, last = [], 0
        for start, end, repl in sorted(_merge(todo)):
            out.append(value[last:start])
            out.append(repl)
            last = end
        out.append(value[last:])
        return "".join(out)
    if is_sealed(value):
        return value
    if isinstance(value, dict):
        return {k: replace_spans(v, f"{path}.{k}", spans) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [replace_spans(v, f"{path}[{i}]", spans) for i, v in enumerate(value)]
    return value


def _merge(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Overlapping spans become one (the first one's replacement names it)."""
    merged: list[tuple[int, int, str]] = []
    for start, end, repl in sorted(spans):
        if merged and start < merged[-1][1]:
            prev = merged[-1]
            merged[-1] = (prev[0], max(prev[1], end), prev[2])
        else:
            merged.append((start, end, repl))
    return merged
