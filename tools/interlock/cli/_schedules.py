"""``interlock schedules``: the tenant's workflow schedules with their next tick."""

from __future__ import annotations

from typing import Annotated

import typer

from interlock.cli._common import connected, with_globals
from interlock.cli._output import Column, Format, OutputOption, columns, emit_rows


def _when(value: object) -> str:
    return str(value or "")[:19].replace("T", " ")


@with_globals
def schedules(
    ctx: typer.Context,
    workflow: Annotated[str | None, typer.Option("--workflow", help="only this workflow's schedule")] = None,
    output: OutputOption = Format.table,
) -> None:
    """Workflow schedules of the tenant (`schedule:` in a workflow): cron or every, time zone, missed-tick
    policy, the next tick (UTC) and the run of the latest tick."""
    found = connected(ctx, lambda client: client.schedules(workflow_id=workflow))
    rows = [row.model_dump(mode="json") for row in found]
    if output is Format.table:  # json and jsonl keep the rows as the query gives them
        rows = [{**row, "schedule": f"cron {row['cron']}" if row["cron"] else f"every {row['every']}",
                 "last_run": f"{row['last_run_id']} ({row['last_run_status']})" if row["last_run_id"] else "—"}
                for row in rows]
    emit_rows(rows, output, columns(
        "workflow_id", "tenant", "schedule", "timezone", "missed",
        Column("next_tick", show=lambda v: _when(v) + " UTC"),
        Column("armed", show=lambda v: "yes" if v else "not yet"),
        Column("last_tick", show=lambda v: _when(v) + " UTC" if v else "—"), "last_run"))
