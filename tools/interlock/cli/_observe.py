"""Observability commands: what runs cost (model usage) and the alerts raised about them."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import typer

from interlock.cli._common import connected, fail, with_globals
from interlock.cli._output import Column, Format, OutputOption, columns, emit_rows

_SPAN = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def since_of(text: str | None) -> datetime | None:
    """``7d``, ``12h``, ``30m`` or an ISO 8601 time -> the datetime it means (None for None)."""
    if text is None:
        return None
    match = _SPAN.match(text.strip())
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--since {text!r}: give a span like 7d, 12h, 30m or an ISO 8601 time like 2026-12-01T00:00:00Z")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@with_globals
def cost(
    ctx: typer.Context,
    by: Annotated[Literal["run", "workflow", "tenant"], typer.Option("--by", help="sum per run, workflow or tenant")]
    = "workflow",
    run: Annotated[str | None, typer.Option("--run", help="only this run")] = None,
    workflow: Annotated[str | None, typer.Option("--workflow", help="only this workflow's runs")] = None,
    since: Annotated[str | None, typer.Option("--since", help="only outcomes since: 7d, 12h, 30m or ISO 8601")]
    = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many rows")] = 100,
    output: OutputOption = Format.table,
) -> None:
    """Model calls, tokens and cost (recorded by agents with ctx.record_llm), most expensive first."""
    moment = since_of(since)
    rows = connected(ctx, lambda client: client.usage(group_by=by, run_id=run, workflow_id=workflow, since=moment,
                                                      limit=limit))
    emit_rows(rows, output, columns(Column("key", header=by.upper()), "runs", "calls", "input_tokens", "output_tokens",
                                    Column("cost_usd", show=lambda v: f"{float(v or 0):.4f}")))
