"""``-o table|json|jsonl`` for every list and describe command, and the small formatting rules
tables share: hashes shortened and marked as such, lists and mappings written out readably."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

HASH_CHARS = 12
ELLIPSIS = "…"


class Format(StrEnum):
    """How a list or describe command prints its result."""

    table = "table"
    json = "json"
    jsonl = "jsonl"


OutputOption = Annotated[Format, typer.Option(
    "--output", "-o", case_sensitive=False,
    help="table: for people; json: one JSON document; jsonl: one JSON object per line")]


def echo(text: str = "") -> None:
    """One line of plain output on stdout."""
    typer.echo(text)


def console() -> Console:
    """A Rich console on stdout; not a terminal (a pipe, a test): wide enough that tables do not wrap."""
    if sys.stdout.isatty():
        return Console(highlight=False)
    return Console(highlight=False, width=int(os.environ.get("COLUMNS", "0") or 0) or 200, color_system=None)


def short_hash(value: str | None, chars: int = HASH_CHARS) -> str:
    """A hash cut to ``chars`` characters with ``…`` marking the cut (``3f2a9c0d1e2b…``); a
    ``version@sha256`` snapshot id keeps its version and shortens the hash."""
    if not value:
        return ""
    prefix, at, digest = value.rpartition("@")
    if len(digest) <= chars:
        return value
    return f"{prefix}{at}{digest[:chars]}{ELLIPSIS}"


def plain(value: Any) -> Any:
    """A JSON-ready copy of ``value`` (pydantic models, dataclasses, datetimes, sets)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def readable(value: Any) -> str:
    """A cell's text: nothing for None, lists comma-separated, mappings as ``key=value``."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={readable(v) if isinstance(v, (Mapping, list)) else v}" for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(readable(v) for v in value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


@dataclass(frozen=True)
class Column:
    """A table column: the row key, its header (default: the key in capitals), how to show a value."""

    key: str
    header: str = ""
    show: Callable[[Any], str] = readable

    @property
    def title(self) -> str:
        return self.header or self.key.upper()


def columns(*specs: str | Column) -> list[Column]:
    """Columns from keys or :class:`Column` specs."""
    return [spec if isinstance(spec, Column) else Column(spec) for spec in specs]


def hash_column(key: str, header: str = "") -> Column:
    """A column of hashes, shortened and marked with ``…``."""
    return Column(key, header, short_hash)


def table(rows: Sequence[Mapping[str, Any]], cols: Sequence[Column], *, title: str | None = None) -> None:
    """Print ``rows`` as a Rich table, or ``(none)``; cell text is never read as Rich markup."""
    if not rows:
        echo("(none)")
        return
    grid = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False, show_edge=False)
    for col in cols:
        grid.add_column(col.title, overflow="fold")
    for row in rows:
        grid.add_row(*(Text(col.show(row.get(col.key))) for col in cols))
    console().print(grid)


def emit_rows(rows: Iterable[Any], fmt: Format, cols: Sequence[Column], *, title: str | None = None) -> None:
    """A list command's output: a table, one JSON array, or one JSON object per line."""
    data = [plain(row) for row in rows]
    if fmt is Format.json:
        echo(json.dumps(data, indent=2, default=str))
    elif fmt is Format.jsonl:
        for row in data:
            echo(json.dumps(row, default=str))
    else:
        table(data, cols, title=title)


def emit_doc(doc: Any, fmt: Format, render: Callable[[Any], None]) -> None:
    """A describe command's output: ``render`` for people, else the document as JSON (jsonl: one line)."""
    data = plain(doc)
    if fmt is Format.json:
        echo(json.dumps(data, indent=2, default=str))
    elif fmt is Format.jsonl:
        echo(json.dumps(data, default=str))
    else:
        render(data)
