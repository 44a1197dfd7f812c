"""``interlock run diff`` and ``interlock run failures``: compare runs, spot repeated breakpoints."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from interlock.cli._common import connected, fail, with_globals
from interlock.cli._output import Column, Format, OutputOption, columns, echo, emit_doc, emit_rows, short_hash, table
from interlock.cli._run import app
from interlock.core.rundiff import since_time

JsonFlag = Annotated[bool, typer.Option("--json", help="same as -o json")]
VALUE_CHARS = 80  # a value longer than this is cut in the table (the JSON output has it whole)


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS - 1] + "…"


def _pair(a: Any, b: Any) -> str:
    """``a`` when both sides agree, else ``a → b``."""
    left, right = _value(a if a is not None else "—"), _value(b if b is not None else "—")
    return left if left == right else f"{left} → {right}"


def _duration(ms: Any) -> str:
    return "" if ms is None else f"{ms / 1000:.2f}s" if ms >= 1000 else f"{ms}ms"


def _side(step: dict[str, Any], side: str, key: str) -> Any:
    view = step.get(side)
    return None if view is None else view.get(key)


def _decision(step: dict[str, Any], side: str) -> Any:
    decision = _side(step, side, "decision")
    rules = _side(step, side, "rules") or []
    return decision and decision + (f" ({', '.join(rules)})" if rules else "")


def _render_diff(doc: dict[str, Any]) -> None:
    a, b = doc["a"], doc["b"]
    echo(f"a: run {a['run_id']}  {a['workflow_id']} v{a['workflow_version']}  {a['status']}"
         f"  {_duration(a['duration_ms'])}")
    echo(f"b: run {b['run_id']}  {b['workflow_id']} v{b['workflow_version']}  {b['status']}"
         f"  {_duration(b['duration_ms'])}")
    for name in doc["run_differs"]:
        echo(f"run {name}: {_pair(a.get(name), b.get(name))}")
    rows = []
    for step in doc["steps"]:
        rows.append({
            "mark": "▶" if step["first_divergence"] else ("≠" if step["differs"] else ""),
            "step": step["step_id"],
            "status": _pair(_side(step, "a", "status"), _side(step, "b", "status")),
            "attempts": _pair(_side(step, "a", "attempts"), _side(step, "b", "attempts")),
            "decision": _pair(_decision(step, "a"), _decision(step, "b")),
            "approval": _pair(_side(step, "a", "approval"), _side(step, "b", "approval")),
            "duration": f"{_duration(_side(step, 'a', 'duration_ms'))} / {_duration(_side(step, 'b', 'duration_ms'))}",
            "differs": ", ".join(step["differs"]),
        })
    table(rows, columns(Column("mark", " "), "step", "status", "attempts", "decision", "approval",
                        Column("duration", "DURATION A / B"), "differs"))
    first = doc["first_divergence"]
    if first is None:
        echo("no divergence: every step agrees")
        return
    echo(f"first divergence: step {first['step_id']} ({', '.join(first['fields'])})")
    for step in doc["steps"]:
        if not step["differs"] or step["a"] is None or step["b"] is None:
            continue
        for name in step["differs"]:
            if name in ("input", "output", "error", "cache"):
                echo(f"  {step['step_id']}.{name}: a={_value(step['a'][name])}")
                echo(f"  {' ' * len(step['step_id'])} {' ' * len(name)}  b={_value(step['b'][name])}")
        if step["a"]["sensitive"] or step["b"]["sensitive"]:
            echo(f"  {step['step_id']}: holds sensitive values, shown as [sensitive] and not compared")


@app.command("diff")
@with_globals
def diff(
    ctx: typer.Context,
    run_a: Annotated[str, typer.Argument(metavar="RUN_A", help="run id")],
    run_b: Annotated[str, typer.Argument(metavar="RUN_B", help="run id")],
    output: OutputOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """Compare two runs step by step (from their logs) and mark the first divergence.

    Status, attempts, inputs and outputs (sensitive values redacted), policy decisions and rules,
    approvals, cache hits and durations; exit 0 when no step differs, 1 when one does.
    """
    result = connected(ctx, lambda client: client.run_diff(run_a, run_b))
    emit_doc(result.as_dict(), Format.json if as_json else output, _render_diff)
    raise typer.Exit(0 if result.first_divergence is None else 1)


def parse_since(raw: str | None) -> datetime | None:
    """``--since``: a duration back from now (``7d``, ``12h``) or an ISO 8601 time."""
    if raw is None:
        return None
    try:
        return since_time(raw, datetime.now(UTC))
    except ValueError as e:
        fail(f"--since: {e}")


FAILURE_COLUMNS = columns("runs", Column("step_id", "STEP"), "error", "last_at",
                          Column("run_ids", "LATEST RUNS", lambda ids: ", ".join(short_hash(i, 8) for i in ids or [])))


@app.command("failures")
@with_globals
def failures(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(metavar="WORKFLOW", help="workflow id")],
    since: Annotated[str | None, typer.Option(
        "--since", metavar="DURATION|TIME", help="only runs started since: 7d, 12h, or an ISO 8601 time")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help="look at most at this many failed runs")
                     ] = 1000,
    output: OutputOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """Failed runs of a workflow grouped by the step and error where they broke, most frequent first."""
    after = parse_since(since)
    groups = connected(ctx, lambda client: client.failures(workflow, since=after, limit=limit))
    emit_rows([g.as_dict() for g in groups], Format.json if as_json else output, FAILURE_COLUMNS)
