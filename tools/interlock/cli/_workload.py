"""Workload control (issue 16): ``interlock breakers`` and ``interlock agents rollout…``."""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from interlock.cli._common import ListGroup, connected, fail, with_globals
from interlock.cli._output import Column, Format, OutputOption, columns, echo, emit_doc, emit_rows
from interlock.contracts.messages import BreakerState, Rollout

breakers = typer.Typer(cls=ListGroup, help="Circuit breakers of the tenant's job topics (steps with `breaker:`).")

TopicArgument = Annotated[str, typer.Argument(metavar="TOPIC", help="the job topic, e.g. llm.summarize")]


def _at(value: Any) -> str:
    return str(value or "")[:19]


def _breaker_row(b: BreakerState) -> dict[str, Any]:
    failed = sum(1 for o in b.recent if not o.ok)
    return {**b.model_dump(mode="json", exclude={"recent"}), "window": f"{failed}/{len(b.recent)} failed"}


@breakers.command("list")
@with_globals
def list_breakers(
    ctx: typer.Context,
    topic: Annotated[str | None, typer.Argument(metavar="[TOPIC]", help="only this topic's breaker")] = None,
    output: OutputOption = Format.table,
) -> None:
    """Each breaker's state (closed, open, half_open), failures in a row, its window and why it last changed."""
    rows = [_breaker_row(b) for b in connected(ctx, lambda client: client.breakers(topic))]
    emit_rows(rows, output, columns("topic", "state", "consecutive_failures", "window",
                                    Column("changed_at", show=_at), Column("retry_at", show=_at), "probe_job",
                                    "reason"))


@breakers.command("log")
@with_globals
def breaker_log(ctx: typer.Context, topic: TopicArgument, output: OutputOption = Format.table) -> None:
    """One breaker's state changes, oldest first (who changed it, when and why)."""
    emit_rows(connected(ctx, lambda client: client.breaker_log(topic)), output,
              columns("seq", Column("at", show=_at), "from_state", "to_state", "reason", "by"))


# -- rollouts (commands of `interlock agents`) ---------------------------------------------------
def parse_share(text: str) -> float:
    """``10%``, ``10`` (percent) or ``0.1`` -> 0.1."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text)
    if not match:
        raise ValueError(f"--canary {text!r}: write a percentage such as 10%")
    value = float(match.group(1))
    share = value / 100 if match.group(2) or value > 1 else value
    if not 0 < share <= 1:
        raise ValueError(f"--canary {text!r}: the share must be above 0% and at most 100%")
    return share


def parse_seconds(text: str) -> float:
    """``300``, ``90s``, ``5m``, ``1h`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise ValueError(f"--window {text!r}: write a duration such as 5m or 300s")
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]


ROLLOUT_COLUMNS = columns(
    "topic", "status", "stable", "canary", Column("share", show=lambda v: f"{float(v):.0%}"),
    Column("canary_stats", "CANARY JOBS/FAILED", show=lambda st: f"{st['jobs']}/{st['failures']}"),
    Column("stable_stats", "STABLE JOBS/FAILED", show=lambda st: f"{st['jobs']}/{st['failures']}"),
    Column("started_at", show=_at), "reason")


def _said(rollout: Rollout, output: Format, what: str) -> None:
    def render(_: Any) -> None:
        echo(f"rollout of {rollout.topic}: {what} (stable {rollout.stable}, canary {rollout.canary} at "
             f"{rollout.share:.0%}; status {rollout.status})")
    emit_doc(rollout, output, render)


def rollout(
    ctx: typer.Context,
    topic: TopicArgument,
    to: Annotated[str, typer.Option("--to", help="the agent version to roll out (its workers must be running)")],
    canary: Annotated[str, typer.Option("--canary", help="the share of jobs it gets, e.g. 10%")] = "10%",
    stable: Annotated[str | None, typer.Option("--from", help="the stable version (default: the one other live "
                                                               "version)")] = None,
    window: Annotated[str, typer.Option("--window", help="promote after this long within the thresholds")] = "5m",
    min_jobs: Annotated[int, typer.Option("--min-jobs", min=1, help="canary jobs needed before any verdict")] = 20,
    max_failure_delta: Annotated[float, typer.Option("--max-failure-delta", min=0.0, help=(
        "roll back when the canary's failure rate exceeds the stable one's by more than this (0.05 = 5 points)"))
    ] = 0.05,
    max_latency_ratio: Annotated[float, typer.Option("--max-latency-ratio", min=0.01, help=(
        "roll back when the canary's median latency exceeds the stable one's times this"))] = 1.5,
    output: OutputOption = Format.table,
) -> None:
    """Send a share of TOPIC's jobs to agent version --to; the dispatchers compare it with the stable
    version and promote it or roll it back."""
    try:
        share, window_s = parse_share(canary), parse_seconds(window)
    except ValueError as e:
        fail(str(e))
    started = connected(ctx, lambda client: client.rollout_start(
        topic, to, share, stable=stable, window_s=window_s, min_jobs=min_jobs, max_failure_delta=max_failure_delta,
        max_latency_ratio=max_latency_ratio))
    _said(started, output, "started")


def rollout_status(
    ctx: typer.Context,
    topic: Annotated[str | None, typer.Argument(metavar="[TOPIC]", help="only this topic's rollout")] = None,
    output: OutputOption = Format.table,
) -> None:
    """Rollouts of the tenant's topics: status, versions, share and what each side did so far."""
    emit_rows(connected(ctx, lambda client: client.rollouts(topic)), output, ROLLOUT_COLUMNS)


def rollout_abort(
    ctx: typer.Context,
    topic: TopicArgument,
    reason: Annotated[str, typer.Option("--reason", help="why (kept with the rollout)")] = "",
    output: OutputOption = Format.table,
) -> None:
    """Stop an active rollout: every job of TOPIC goes to the stable version."""
    _said(connected(ctx, lambda client: client.rollout_abort(topic, reason=reason)), output, "aborted")


def rollout_clear(ctx: typer.Context, topic: TopicArgument, output: OutputOption = Format.table) -> None:
    """Remove a finished rollout: TOPIC's jobs go to any worker again (unversioned)."""
    _said(connected(ctx, lambda client: client.rollout_clear(topic)), output, "cleared")


def register(agents: typer.Typer) -> None:
    for name, command in (("rollout", rollout), ("rollout-status", rollout_status), ("rollout-abort", rollout_abort),
                          ("rollout-clear", rollout_clear)):
        agents.command(name)(with_globals(command))
